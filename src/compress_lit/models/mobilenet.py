"""MobileNetV2 (torchvision's module layout) returning its 1280-d pooled feature as the embedding."""
from __future__ import annotations

from torchvision.models.mobilenetv2 import MobileNetV2 as _TVMobileNetV2

from .pooled import PooledFeatures, first_conv, replace_input_channels, strided_conv, unstride


class MobileNetV2(PooledFeatures):
    def __init__(self, small_input: bool = False, width_multiplier: float = 1.0, in_channels: int = 3,
                 num_classes: int | None = None):
        net = _TVMobileNetV2(width_mult=width_multiplier)
        if small_input:  # 28-32 px: stride 1 in the stem and the first strided block
            unstride(first_conv(net.features[0]), strided_conv(net.features[2]))
        replace_input_channels(net.features, in_channels)
        super().__init__(net.features, net.last_channel, num_classes)
