"""``mocov3``: the MoCo v3 releases (facebookresearch/moco-v3: ``r-50-1000ep.pth.tar``, ``vit-s-300ep.pth.tar``,
``vit-b-300ep.pth.tar``).

File (``main_moco.py``): ``{'epoch', 'arch', 'state_dict', 'optimizer', 'scaler'}``; ``state_dict`` is the
DistributedDataParallel-wrapped MoCo model's: ``module.base_encoder.<backbone key>``,
``module.momentum_encoder.*`` and ``module.predictor.*``. As ``main_lincls.py`` does, only the base encoder is
kept, without its projection head (the MLP that replaced the classifier: ``head.*`` for the ViTs, ``fc.*`` for
ResNet-50); the momentum encoder and the predictor are dropped.

Base encoders: ResNet-50 in torchvision's layout; ViT-S and ViT-B from ``vits.py`` (timm's VisionTransformer:
``cls_token``, ``pos_embed`` (1, 197, D) holding fixed 2-D sin-cos positions with a zero class position,
``patch_embed.proj.*``, ``blocks.<i>.*``, ``norm.*``), D = 384 / 768, **12 heads for both**, LayerNorm eps 1e-6.
MoCo v3's ViT-S has 12 heads where DINO's has 6 — the same weight shapes — hence its own architecture
``vit_small_patch16_mocov3``; ViT-B is ``vit_base_patch16``. MoCo v3 runs at 224 px only; at other sizes the
position table is interpolated as DINO's (our choice).

The embedding MoCo v3's linear probe reads: the class token after the final norm (ViT), the pooled 2048-d feature
(ResNet-50).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ...models import ViT
from ..checkpoint import CheckpointFormat, Mapped, inner_state_dict, need_prefix, under_prefix

PREFIX = "module.base_encoder."
ARCHS = ("vit_small_patch16_mocov3", "vit_base_patch16", "resnet50")
WHAT = ("a MoCo v3 release checkpoint: a dict with 'state_dict' whose keys are 'module.base_encoder.<backbone key>' "
        "(and 'module.momentum_encoder.*', 'module.predictor.*')")


def map_mocov3(obj: Any, model: nn.Module) -> Mapped:
    sd = inner_state_dict(obj, WHAT)
    need_prefix(sd, PREFIX, WHAT)
    head = "head." if isinstance(model, ViT) else "fc."  # main_lincls.py's linear_keyword
    return under_prefix(sd, PREFIX, dropped=lambda rest: rest.startswith(head),
                        ignored=lambda k: k.startswith(("module.momentum_encoder.", "module.predictor.")))


FORMATS = (CheckpointFormat(
    "mocov3", "MoCo v3 release (r-50-1000ep.pth.tar, vit-s-300ep.pth.tar, vit-b-300ep.pth.tar): {'state_dict': "
    "{'module.base_encoder.<key>': ...}}; the base encoder's head (head.* ViT, fc.* ResNet), "
    "module.momentum_encoder.*, module.predictor.* dropped", map_mocov3, ARCHS,
    "MoCo v3's ViT-S has 12 attention heads (vit_small_patch16_mocov3) where DINO's has 6: the weights have the "
    "same shapes, so only teacher.arch tells them apart"),)
