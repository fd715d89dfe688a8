"""A timm model as a backbone: any ``timm.create_model`` name, with this library's embedding rules.

* a ViT-like model (timm's token models: a ``patch_embed`` and ``num_prefix_tokens``): ``embedding`` None or
  ``cls`` is the class token after the final norm (what DINO, DINOv2 and MoCo v3 evaluate, and timm's own
  pre-logits feature for its token-pooled ViTs); ``mean_patch`` the mean of the normed patch tokens (class and
  register tokens excluded); ``cls_and_mean`` both, concatenated: the rules of :mod:`.vit`. timm builds it with
  ``dynamic_img_size=True``, so another input size than its position table's is resampled *as timm does*
  (``resample_abs_pos_embed``: bicubic), not with the release's own ``interpolate_pos_encoding`` (our ViTs of
  :mod:`.vit` follow DINO / DINOv2 exactly);
* any other model (CNNs): timm's pre-logits feature, ``forward_head(forward_features(x), pre_logits=True)``: the
  pooled feature of a ResNet or an EfficientNet, MobileNetV3's 1280-d feature after its head convolution;
  ``embedding`` does not apply.

``forward_features`` names one layer, ``pool`` (the embedding). The weights are timm's business
(:mod:`compress_lit.teachers.timm_teacher`); this module only wraps a built model.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .vit import EMBEDDINGS


def is_token_model(model: nn.Module) -> bool:
    """timm's ViT-like models: patch tokens after ``num_prefix_tokens`` class / register tokens."""
    return hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


def arch_of(name: str) -> str:
    """The timm architecture of a model name with or without its pretrained tag (``vit_small_patch14_dinov2`` of
    ``vit_small_patch14_dinov2.lvd142m``)."""
    return name.split(".", 1)[0]


def create(name: str, **kw: Any) -> nn.Module:
    """``timm.create_model(name, **kw)``; ViT-like models with ``dynamic_img_size=True`` (any input size), the
    others as they are (their constructors refuse the argument before any weight is read)."""
    import timm

    try:
        return timm.create_model(name, dynamic_img_size=True, **kw)
    except TypeError as e:
        if "dynamic_img_size" not in str(e):
            raise
        return timm.create_model(name, **kw)


@functools.lru_cache(maxsize=32)
def token_layout(name: str) -> tuple[bool, Optional[int]]:
    """Whether timm model ``name`` is ViT-like, and its patch size (None when it has none, or not square): built on
    the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = create(arch_of(name), pretrained=False)
    if not is_token_model(model):
        return False, None
    p = getattr(model.patch_embed, "patch_size", None)
    p = tuple(p) if isinstance(p, (tuple, list)) else (p, p)
    return True, (int(p[0]) if p[0] == p[1] else None)


def patch_size(name: str) -> Optional[int]:
    """The patch size of timm model ``name``; None for a model without patches (a CNN)."""
    return token_layout(name)[1]


class TimmBackbone(nn.Module):
    layer_names = ("pool",)

    def __init__(self, model: nn.Module, name: str, embedding: Optional[str] = None):
        super().__init__()
        self.model = model.eval()
        self.token_model = is_token_model(model)
        if embedding is not None and not self.token_model:
            raise ValueError(f"teacher.embedding={embedding!r} applies to ViT models only; timm's {name} "
                             f"({type(model).__name__}) gives its pre-logits feature")
        if embedding is not None and embedding not in EMBEDDINGS:
            raise ValueError(f"teacher.embedding={embedding!r}: choose one of {list(EMBEDDINGS)}")
        self.embedding = embedding
        self.arch_name = "timm"
        self.timm_name = name
        if self.token_model:
            width = int(model.embed_dim)
            self.embed_dim = 2 * width if embedding == "cls_and_mean" else width
        else:
            self.embed_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.token_model:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        tokens = self.model.forward_features(x)  # B x (prefix + patches) x D, after the final norm
        cls = tokens[:, 0]
        if self.embedding in (None, "cls"):
            return cls
        mean = tokens[:, self.model.num_prefix_tokens:].mean(dim=1)
        return mean if self.embedding == "mean_patch" else torch.cat([cls, mean], dim=1)

    def forward_features(self, x: torch.Tensor, layers: Sequence[str] = ("pool",)) -> dict[str, torch.Tensor]:
        unknown = [n for n in layers if n not in self.layer_names]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown} for a timm teacher: it has only 'pool' (its embedding)")
        return {"pool": self(x)}


__all__ = ["TimmBackbone", "arch_of", "create", "is_token_model", "patch_size", "token_layout"]
