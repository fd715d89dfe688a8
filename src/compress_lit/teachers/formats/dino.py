"""``dino``: the DINO torch.hub releases (facebookresearch/dino ``hubconf.py``).

ViT-S/16, ViT-S/8, ViT-B/16, ViT-B/8 (``dino_deitsmall16_pretrain.pth``, ``dino_deitsmall8_pretrain.pth``,
``dino_vitbase16_pretrain.pth``, ``dino_vitbase8_pretrain.pth``): the backbone's plain state_dict, loaded there
with ``strict=True`` into ``VisionTransformer(num_classes=0)``: ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1 + N, D)
at 224 px (N = 196 for /16, 784 for /8), ``patch_embed.proj.{weight,bias}``, ``blocks.<i>.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight,bias}`` for i < 12, ``norm.{weight,bias}``; no head. D = 384 (6 heads)
for ViT-S, 768 (12 heads) for ViT-B; LayerNorm eps 1e-6, qkv bias. Our ViT has exactly these names, so the table
is the identity; the position table is interpolated at run time as DINO's ``interpolate_pos_encoding`` does.

ResNet-50 (``dino_resnet50_pretrain.pth``): a torchvision-layout ResNet-50 state_dict without ``fc`` (the hub
loads it with ``strict=False`` into ``resnet50()`` whose fc is replaced by an identity).

The embedding DINO evaluates: the class token after the final norm (ViT), the pooled 2048-d feature (ResNet-50).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..checkpoint import CheckpointFormat, Mapped, plain_backbone

ARCHS = ("vit_small_patch16", "vit_small_patch8", "vit_base_patch16", "vit_base_patch8", "resnet50")
WHAT = ("a DINO release (*_pretrain.pth): the backbone's plain state_dict ('cls_token', 'pos_embed', "
        "'patch_embed.proj.weight', 'blocks.0.norm1.weight', ..., 'norm.weight'; ResNet-50: torchvision keys "
        "without fc)")


def map_dino(obj: Any, model: nn.Module) -> Mapped:
    return plain_backbone(obj, WHAT)


FORMATS = (CheckpointFormat(
    "dino", "DINO release (dino_deitsmall16_pretrain.pth, ...): plain state_dict {'cls_token', 'pos_embed', "
    "'patch_embed.proj.*', 'blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*', 'norm.*'}; "
    "ResNet-50: torchvision keys without fc", map_dino, ARCHS,
    "DINO released ViT-S/16, ViT-S/8, ViT-B/16, ViT-B/8 (6 heads for ViT-S) and ResNet-50"),)
