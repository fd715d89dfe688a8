"""Backbones. Each returns its embedding from ``forward`` and named layers from ``forward_features``.

``build_backbone(arch, **kw)`` is the one way the rest of the package makes a network; ``embed_dim`` says how
wide the embedding is, ``layer_names`` which layers ``forward_features`` can return.
"""
from __future__ import annotations

from torch import nn

from .alexnet import AlexNet
from .mobilenet import MobileNetV2
from .resnet import ResNet, resnet18, resnet50, resnet50x4

ARCHITECTURES = {
    "alexnet": AlexNet,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet50x4": resnet50x4,
    "mobilenetv2": MobileNetV2,
}


def build_backbone(arch: str, small_input: bool = False, width_multiplier: float | None = None,
                   **kw) -> nn.Module:
    """Make a backbone by name. ``width_multiplier=None`` keeps the architecture's own width."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if width_multiplier is not None:
        kw["width_multiplier"] = width_multiplier
    return ARCHITECTURES[arch](small_input=small_input, **kw)


def embedding_layer(arch: str) -> str:
    """The layer whose output is the architecture's embedding (docs/paper.md: AlexNet fc7, others the pool)."""
    return "fc7" if arch == "alexnet" else "pool"


__all__ = ["AlexNet", "MobileNetV2", "ResNet", "ARCHITECTURES", "build_backbone", "embedding_layer"]
