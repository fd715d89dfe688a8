"""The AlexNet used by CompReSS: five convolutions, fc6 and fc7 (4096 each), no BatchNorm, no dropout.

The official CompReSS AlexNet has its two ``nn.Dropout`` layers commented out, so the student's embedding (and the
2q momentum copy's keys) are never dropout-noised; ``dropout > 0`` (``student.dropout``) puts them back in front
of fc6 and fc7, as in torchvision's classifier, for experiments that want it.

Its embedding is ReLU(fc7). Layer names follow the paper's evaluation vocabulary (``conv1`` … ``conv5``,
``fc6``, ``fc7``) so that ``forward_features`` can hand any of them to the evaluations.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class AlexNet(nn.Module):
    layer_names = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")

    def __init__(
        self,
        small_input: bool = False,
        width_multiplier: float = 1.0,
        fc_dim: int = 4096,
        in_channels: int = 3,
        dropout: float = 0.0,
        num_classes: int | None = None,
    ):
        super().__init__()
        w = [int(round(c * width_multiplier)) for c in (64, 192, 384, 256, 256)]
        if small_input:  # 28-32 px: 3x3 stride-1 first conv, pools after conv1, conv2 and conv5 only
            self.conv1 = nn.Sequential(nn.Conv2d(in_channels, w[0], 3, 1, 1), nn.ReLU(inplace=True))
            self.pool1 = nn.MaxPool2d(2, 2)
            pooled = 2
        else:  # 224 px, as torchvision's AlexNet (caffe widths)
            self.conv1 = nn.Sequential(nn.Conv2d(in_channels, w[0], 11, 4, 2), nn.ReLU(inplace=True))
            self.pool1 = nn.MaxPool2d(3, 2)
            pooled = 6
        k = 3 if small_input else 5
        self.conv2 = nn.Sequential(nn.Conv2d(w[0], w[1], k, 1, k // 2), nn.ReLU(inplace=True))
        self.pool2 = nn.MaxPool2d(2, 2) if small_input else nn.MaxPool2d(3, 2)
        self.conv3 = nn.Sequential(nn.Conv2d(w[1], w[2], 3, 1, 1), nn.ReLU(inplace=True))
        self.conv4 = nn.Sequential(nn.Conv2d(w[2], w[3], 3, 1, 1), nn.ReLU(inplace=True))
        self.conv5 = nn.Sequential(nn.Conv2d(w[3], w[4], 3, 1, 1), nn.ReLU(inplace=True))
        self.pool5 = nn.AdaptiveMaxPool2d(pooled)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"AlexNet dropout must be in [0, 1), got {dropout}")
        # no dropout: an identity stands in its place, so state_dict keys (fc6.1.*, fc7.1.*) are the same either way
        drop = (lambda: nn.Dropout(dropout)) if dropout > 0 else nn.Identity
        self.fc6 = nn.Sequential(drop(), nn.Linear(w[4] * pooled * pooled, fc_dim), nn.ReLU(inplace=True))
        self.fc7 = nn.Sequential(drop(), nn.Linear(fc_dim, fc_dim), nn.ReLU(inplace=True))
        self.embed_dim = fc_dim
        self.fc = nn.Linear(fc_dim, num_classes) if num_classes else None

    def forward_features(self, x: torch.Tensor, layers: Sequence[str] = ("fc7",)) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        last = max(self.layer_names.index(n) for n in layers) if layers else len(self.layer_names) - 1
        x = self.conv1(x)
        steps = [
            ("conv1", lambda t: t),
            ("conv2", lambda t: self.conv2(self.pool1(t))),
            ("conv3", lambda t: self.conv3(self.pool2(t))),
            ("conv4", self.conv4),
            ("conv5", self.conv5),
            ("fc6", lambda t: self.fc6(torch.flatten(self.pool5(t), 1))),
            ("fc7", self.fc7),
        ]
        for i, (name, fn) in enumerate(steps):
            x = fn(x)
            if name in layers:
                out[name] = x
            if i >= last:
                break
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x, ("fc7",))["fc7"]
