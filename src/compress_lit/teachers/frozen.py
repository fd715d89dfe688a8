"""The frozen teacher: a backbone that never trains."""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import nn

from .checkpoint import sample


class FrozenTeacher(nn.Module):
    """A backbone that never trains: no parameter requires grad, every module stays in eval mode.

    ``train(True)`` (what Lightning calls on the LightningModule each epoch) leaves it in eval mode, so the
    teacher's BatchNorm always uses its running statistics. ``forward`` runs under ``torch.no_grad()`` and returns
    the backbone's embedding (``embed_dim`` wide).
    """

    def __init__(self, backbone: nn.Module, name: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.embed_dim = int(backbone.embed_dim)
        self.name = name
        self.layer_names = tuple(getattr(backbone, "layer_names", ()))
        backbone.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone(x)

    def forward_features(self, x: torch.Tensor, layers: Sequence[str] = ("pool",)) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.backbone.forward_features(x, layers)

    def assert_frozen(self) -> None:
        training = [n or "<teacher>" for n, m in self.named_modules() if m.training]
        if training:
            raise AssertionError(f"teacher modules in training mode: {sample(training)}")
        grads = [n for n, p in self.named_parameters() if p.requires_grad]
        if grads:
            raise AssertionError(f"teacher parameters that require grad: {sample(grads)}")

    def fingerprint(self) -> str:
        """A short hash of the weights (names, shapes, dtypes and a strided sample of every tensor).

        Device independent (the sample is exact, no floating-point reductions) and cheap even for ResNet-50x4.
        """
        h = hashlib.sha1()
        for name, t in self.backbone.state_dict().items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            flat = t.detach().reshape(-1)
            if flat.numel():
                step = max(1, flat.numel() // 256)
                sample_ = flat[::step][:256].to("cpu", torch.float64 if t.is_floating_point() else torch.int64)
                h.update(sample_.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


__all__ = ["FrozenTeacher"]
