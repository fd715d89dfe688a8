"""The shared shape of torchvision's mobile classifiers (MobileNetV2, MobileNetV3, EfficientNet): a ``features``
trunk, a global average pool and a ``classifier`` head. The backbone keeps the trunk with torchvision's own module
names (so torchvision's files load by name) and returns the pooled feature as its embedding; the classifier is
dropped (``head_prefixes``: the torchvision format skips those keys of a classifier's file)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class PooledFeatures(nn.Module):
    layer_names = ("features", "pool")
    head_prefixes = ("classifier.",)

    def __init__(self, features: nn.Module, embed_dim: int, num_classes: int | None = None):
        super().__init__()
        self.features = features
        self.embed_dim = int(embed_dim)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.embed_dim, num_classes) if num_classes else None

    def forward_features(self, x: torch.Tensor, layers: Sequence[str] = ("pool",)) -> dict[str, torch.Tensor]:
        f = self.features(x)
        out = {}
        if "features" in layers:
            out["features"] = f
        if "pool" in layers:
            out["pool"] = torch.flatten(self.avgpool(f), 1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x, ("pool",))["pool"]


def first_conv(block: nn.Module) -> nn.Conv2d:
    """The first convolution inside ``block`` (a torchvision Conv2dNormActivation or an inverted residual)."""
    return next(m for m in block.modules() if isinstance(m, nn.Conv2d))


def strided_conv(block: nn.Module) -> nn.Conv2d:
    """The convolution of ``block`` that has stride 2 (the depthwise one of an inverted residual)."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    if len(convs) != 1:
        raise ValueError(f"{type(block).__name__} has {len(convs)} strided convolutions, expected 1")
    return convs[0]


def unstride(*convs: nn.Conv2d) -> None:
    """Stride 1 (small inputs: 16-32 px keep a spatial map to the end)."""
    for c in convs:
        c.stride = (1, 1)


def replace_input_channels(features: nn.Module, in_channels: int) -> None:
    """A first convolution taking ``in_channels`` instead of 3 (same kernel, stride and padding)."""
    if in_channels == 3:
        return
    stem = features[0]
    old = stem[0]
    stem[0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)


__all__ = ["PooledFeatures", "first_conv", "replace_input_channels", "strided_conv", "unstride"]
