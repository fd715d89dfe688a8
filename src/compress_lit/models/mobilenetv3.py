"""MobileNetV3-Large (torchvision's ``mobilenet_v3_large`` module layout), a mobile student.

The embedding is the global average pool of the last ``features`` convolution: 960-d (``width_multiplier`` scales
it, 480-d at 0.5). torchvision's classifier (``Linear(960, 1280)``, Hardswish, dropout, ``Linear(1280, 1000)``) is
the ImageNet head and is not part of the backbone, as MobileNetV2's 1280-d pool is taken before its classifier.
``small_input`` (16-32 px): stride 1 in the stem and in the first strided block (total stride 8 instead of 32).
"""
from __future__ import annotations

from torchvision.models import mobilenet_v3_large

from .pooled import PooledFeatures, first_conv, replace_input_channels, strided_conv, unstride


class MobileNetV3Large(PooledFeatures):
    def __init__(self, small_input: bool = False, width_multiplier: float = 1.0, in_channels: int = 3,
                 num_classes: int | None = None):
        net = mobilenet_v3_large(weights=None, width_mult=width_multiplier)
        if small_input:
            unstride(first_conv(net.features[0]), strided_conv(net.features[2]))
        replace_input_channels(net.features, in_channels)
        super().__init__(net.features, first_conv(net.features[-1]).out_channels, num_classes)
