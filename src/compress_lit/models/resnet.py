"""ResNet backbones with torchvision's parameter names, a width multiplier and a small-input stem.

The key layout (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0`` …, ``fc``) is exactly
torchvision's, so torchvision-layout, MoCo and SwAV checkpoints map onto it by stripping prefixes only.
``width_multiplier=4`` with Bottleneck blocks gives SimCLR v1's ResNet-50x4 (stem 256 channels, 8192-d pool):
every channel count is widened, not only the inner 3x3 convolutions as torchvision's ``wide_resnet`` does.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + idt)


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + idt)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ResNet(nn.Module):
    """ResNet returning the global-average-pooled feature as its embedding.

    ``forward(x)`` returns the embedding (``embed_dim`` wide); ``forward_features(x, layers)`` returns a dict of
    named intermediate outputs (``stem``, ``layer1`` … ``layer4``, ``pool``). ``fc`` exists only when
    ``num_classes`` is given (supervised baselines, or to load a checkpoint's classifier); it is never part of
    the embedding.
    """

    layer_names = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: Sequence[int],
        width_multiplier: float = 1.0,
        base_width: int = 64,
        small_input: bool = False,
        in_channels: int = 3,
        num_classes: int | None = None,
    ):
        super().__init__()
        stem = int(round(base_width * width_multiplier))
        if small_input:  # 28-32 px images: 3x3 stride-1 stem, no max-pool (CIFAR-style)
            self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, stem, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        in_ch = stem
        for i, depth in enumerate(depths):
            planes = stem * (2**i)
            blocks = []
            for j in range(depth):
                blocks.append(block(in_ch, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(depths)
        self.embed_dim = in_ch
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes) if num_classes else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor, layers: Sequence[str] = ("pool",)) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        if "stem" in layers:
            out["stem"] = x
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            if f"layer{i + 1}" in layers:
                out[f"layer{i + 1}"] = x
        if "pool" in layers:
            out["pool"] = torch.flatten(self.avgpool(x), 1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x, ("pool",))["pool"]


def resnet18(**kw) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), **kw)


def resnet34(**kw) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), **kw)


def resnet50(**kw) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), **kw)


def resnet50x4(**kw) -> ResNet:
    kw.setdefault("width_multiplier", 4.0)
    return ResNet(Bottleneck, (3, 4, 6, 3), **kw)
