"""EfficientNet-B0 (torchvision's ``efficientnet_b0`` module layout), a mobile student.

The embedding is the global average pool of the last ``features`` convolution (320 -> 1280, BN, SiLU): 1280-d
(``width_multiplier`` scales every stage: 640-d at 0.5). torchvision's classifier (dropout, ``Linear(1280,
1000)``) is dropped. The stage table is B0's (the EfficientNet paper, Table 1; depth multiplier 1) built from
torchvision's public ``MBConvConfig``. ``small_input`` (16-32 px): stride 1 in the stem and in the first strided
stage (total stride 8 instead of 32).

Stochastic depth (``drop_path``, ``student.drop_path``): each residual block is dropped per sample in training with
probability ``drop_path x i / 16`` for block i = 0..15 (torchvision's ``stochastic_depth_prob``). The default 0.2 is
torchvision's and equals SEED's student (its ``efficientnet_b0`` is lukemelas' EfficientNet-PyTorch, whose
``drop_connect_rate`` defaults to 0.2 with the same i / 16 scaling and the same residual-only rule). DisCo builds
timm's ``efficientnet_b0`` with no ``drop_path_rate``, whose default is 0 (timm: "for train, drop_path_rate should
be 0.2", but nothing sets it): no stochastic depth, ``drop_path=0`` (the ``family/disco_*`` preset).
"""
from __future__ import annotations

from functools import partial

from torchvision.models.efficientnet import EfficientNet, MBConvConfig

from .pooled import PooledFeatures, first_conv, replace_input_channels, strided_conv, unstride

# (expand ratio, kernel, stride, input channels, output channels, layers) per stage
B0_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
             (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))
#: the default stochastic depth: torchvision's, and SEED's (lukemelas' drop_connect_rate); DisCo's timm model: 0
DROP_PATH = 0.2


class EfficientNetB0(PooledFeatures):
    def __init__(self, small_input: bool = False, width_multiplier: float = 1.0, in_channels: int = 3,
                 num_classes: int | None = None, drop_path: float = DROP_PATH):
        if not 0 <= drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        conf = partial(MBConvConfig, width_mult=width_multiplier, depth_mult=1.0)
        net = EfficientNet([conf(*stage) for stage in B0_STAGES], dropout=0.2, stochastic_depth_prob=drop_path)
        if small_input:
            unstride(first_conv(net.features[0]), strided_conv(net.features[2][0]))
        replace_input_channels(net.features, in_channels)
        super().__init__(net.features, first_conv(net.features[-1]).out_channels, num_classes)
        self.drop_path = float(drop_path)
