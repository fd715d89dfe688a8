"""A plain 4-stage VGG-style conv net: the Fashion-MNIST reproduction's teacher.

Per stage: ``convs_per_stage`` x (3x3 conv, BatchNorm, ReLU); a 2x2 max-pool between stages; global average pool
of the last stage as the embedding (``widths[-1] * width_multiplier`` wide). At 28 px the stages run at 28, 14, 7
and 3 px.

Why it exists: on 28 px grey images and 2 CPU cores a wide plain conv net gives more representation per
CPU-minute than a small-input ResNet-18 (docs/reproduction.md: a width-64..512 conv net pretrained with MoCo v2
clears the raw-pixel bars that a ResNet-18 on the same budget did not). It is not a paper architecture.

Layer names: ``stage1`` .. ``stage4`` (feature maps) and ``pool`` (the embedding).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ConvNet(nn.Module):
    layer_names = ("stage1", "stage2", "stage3", "stage4", "pool")

    def __init__(self, small_input: bool = True, width_multiplier: float = 1.0,
                 widths: Sequence[int] = (64, 128, 256, 512), convs_per_stage: int = 1, in_channels: int = 3,
                 num_classes: int | None = None):
        super().__init__()
        if not small_input:
            raise ValueError("convnet is a small-input (16-32 px) architecture: set small_input=true")
        if convs_per_stage < 1:
            raise ValueError(f"convnet needs convs_per_stage >= 1, got {convs_per_stage}")
        chans = [max(1, int(round(w * width_multiplier))) for w in widths]
        c_in = in_channels
        for i, c in enumerate(chans):
            layers: list[nn.Module] = []
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(c_in, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
            setattr(self, f"stage{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(chans)
        self.pool = nn.MaxPool2d(2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embed_dim = c_in
        self.fc = nn.Linear(c_in, num_classes) if num_classes else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor, layers: Sequence[str] = ("pool",)) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i in range(self.num_stages):
            if i > 0:
                x = self.pool(x)
            x = getattr(self, f"stage{i + 1}")(x)
            if f"stage{i + 1}" in layers:
                out[f"stage{i + 1}"] = x
        if "pool" in layers:
            out["pool"] = torch.flatten(self.avgpool(x), 1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x, ("pool",))["pool"]
