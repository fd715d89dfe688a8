"""MobileNetV2 (torchvision's module layout) returning its 1280-d pooled feature as the embedding."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2 as _TVMobileNetV2


class MobileNetV2(nn.Module):
    layer_names = ("features", "pool")

    def __init__(self, small_input: bool = False, width_multiplier: float = 1.0, in_channels: int = 3,
                 num_classes: int | None = None):
        super().__init__()
        net = _TVMobileNetV2(width_mult=width_multiplier)
        if small_input:  # 28-32 px: stride 1 in the stem and the first strided block
            net.features[0][0].stride = (1, 1)
            net.features[2].conv[1][0].stride = (1, 1)
        if in_channels != 3:
            old = net.features[0][0]
            net.features[0][0] = nn.Conv2d(in_channels, old.out_channels, 3, old.stride, 1, bias=False)
        self.features = net.features
        self.embed_dim = net.last_channel
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
