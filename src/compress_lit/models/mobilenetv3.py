"""MobileNetV3-Large (torchvision's ``mobilenet_v3_large`` module layout), a mobile student.

The embedding is the 1,280-d feature of MobileNetV3's "efficient last stage": the global average pool of the last
``features`` convolution (960-d), then ``Linear(960, 1280)`` and Hardswish. That is the feature SEED and DisCo
distil into (their timm MobileNetV3's ``conv_head`` (a 1x1 convolution on the pooled map, with bias) and ``act2``,
then ``classifier = Linear(num_features, dim)``; timm calls it ``num_features`` in the releases they copied and
``head_hidden_size`` / ``forward_head(pre_logits=True)`` today) and the one MobileNetV3's authors classify from. In
torchvision's classifier (``Linear(960, 1280)``, Hardswish, dropout, ``Linear(1280, 1000)``) it is the output of the
first two modules, so ``classifier.0`` is part of the backbone (its keys keep torchvision's names and a torchvision
file loads it) and only ``classifier.3``, the 1000-way layer, is the ImageNet head.

``mobilenetv3_large_pool`` (``head=False``) is the explicit alternative: the 960-d average pool alone, without the
960 -> 1280 layer (``classifier.*`` is then all head). Both expose the 960-d pool as layer ``avgpool`` besides the
embedding (``pool``). ``width_multiplier`` scales every width as torchvision does: at 0.5 the pool is 480-d and the
embedding 640-d (timm keeps its head at 1,280). ``small_input`` (16-32 px): stride 1 in the stem and in the first
strided block (total stride 8 instead of 32).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large

from .pooled import PooledFeatures, first_conv, replace_input_channels, strided_conv, unstride


class MobileNetV3Large(PooledFeatures):
    layer_names = ("features", "avgpool", "pool")

    def __init__(self, small_input: bool = False, width_multiplier: float = 1.0, in_channels: int = 3,
                 num_classes: int | None = None, head: bool = True):
        net = mobilenet_v3_large(weights=None, width_mult=width_multiplier)
        if small_input:
            unstride(first_conv(net.features[0]), strided_conv(net.features[2]))
        replace_input_channels(net.features, in_channels)
        pooled = first_conv(net.features[-1]).out_channels
        linear, act = net.classifier[0], net.classifier[1]  # Linear(960, 1280), Hardswish
        super().__init__(net.features, linear.out_features if head else pooled, num_classes)
        self.pooled_dim = int(pooled)
        self.head = bool(head)
        if head:
            self.classifier = nn.Sequential(linear, act)  # torchvision's classifier.0, classifier.1
            self.head_prefixes = ("classifier.3.",)  # torchvision's Linear(1280, 1000): the ImageNet head

    def forward_features(self, x: torch.Tensor, layers: Sequence[str] = ("pool",)) -> dict[str, torch.Tensor]:
        f = self.features(x)
        out = {}
        if "features" in layers:
            out["features"] = f
        if "avgpool" in layers or "pool" in layers:
            a = torch.flatten(self.avgpool(f), 1)
            if "avgpool" in layers:
                out["avgpool"] = a
            if "pool" in layers:
                out["pool"] = self.classifier(a) if self.head else a
        return out


def mobilenetv3_large_pool(**kw) -> MobileNetV3Large:
    """MobileNetV3-Large whose embedding is the 960-d average pool (no 960 -> 1280 layer)."""
    return MobileNetV3Large(head=False, **kw)
