"""``dinov2``: the DINOv2 torch.hub backbones (facebookresearch/dinov2 ``dinov2/hub/backbones.py``).

ViT-S/14, ViT-B/14, ViT-L/14, with and without registers (``dinov2_vits14_pretrain.pth``,
``dinov2_vitb14_reg4_pretrain.pth`` ...): the plain state_dict of ``DinoVisionTransformer`` (img_size 518,
patch 14, layer scale, ``block_chunks=0``), loaded there with ``strict=True``:

* ``cls_token`` (1, 1, D); ``pos_embed`` (1, 1 + 37 x 37, D) = (1, 1370, D) at 518 px; ``mask_token`` (1, D),
  used only by masked-image training and **dropped** here; ``register_tokens`` (1, 4, D) in the ``_reg4`` files;
* ``patch_embed.proj.{weight,bias}`` (D, 3, 14, 14);
* ``blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight,bias}`` and the layer scales
  ``blocks.<i>.ls1.gamma``, ``blocks.<i>.ls2.gamma`` (D,), for i < 12 (ViT-S, B) or 24 (ViT-L);
* ``norm.{weight,bias}``.

D = 384 / 768 / 1024 (6 / 12 / 16 heads). Our ViT uses the same names (the table is the identity less
``mask_token``). The position table stays at the released 37 x 37 grid and is interpolated to the input's grid at
run time, as DINOv2's ``interpolate_pos_encoding``: bicubic with scale (grid + 0.1) / 37, no antialiasing, for the
plain models; bicubic to the size with antialiasing for the register models (their hub settings). Registers are
inserted after the class token, after the position embedding. ViT-g/14 (SwiGLU ``mlp.w12``/``w3``) is not
supported: its keys are reported as unexpected.

The embedding DINOv2 evaluates with k-NN: the class token after the final norm (``x_norm_clstoken``);
``teacher.embedding=cls_and_mean`` is its linear-probe feature (class token and mean patch token).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..checkpoint import CheckpointFormat, LayoutMismatch, Mapped, plain_state_dict, sample, unwrapped_identity
from ..wrappers import unprefixed

ARCHS = ("vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_large_patch14_dinov2",
         "vit_small_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2", "vit_large_patch14_reg4_dinov2")
WHAT = ("a DINOv2 hub backbone (dinov2_vit*14[_reg4]_pretrain.pth): a plain state_dict with 'cls_token', "
        "'pos_embed', 'mask_token', ['register_tokens'], 'patch_embed.proj.*', 'blocks.<i>.*' (with ls1.gamma, "
        "ls2.gamma), 'norm.*'")


def map_dinov2(obj: Any, model: nn.Module) -> Mapped:
    sd = plain_state_dict(obj, WHAT)
    if "mask_token" not in unprefixed(sd)[0]:  # (a DataParallel / DDP 'module.' prefix is stripped)
        raise LayoutMismatch(f"expected {WHAT}, but there is no 'mask_token' (every DINOv2 backbone file has one); "
                             f"the file's keys are {sample(list(sd))}")
    return unwrapped_identity(sd, dropped=lambda k: k == "mask_token")


FORMATS = (CheckpointFormat(
    "dinov2", "DINOv2 hub backbone (dinov2_vitb14_pretrain.pth, ..._reg4_...): plain state_dict {'cls_token', "
    "'pos_embed' (37x37 + 1 at 518 px), 'mask_token' (dropped), ['register_tokens'], 'patch_embed.proj.*', "
    "'blocks.<i>.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*', 'norm.*'}", map_dinov2,
    ARCHS, "DINOv2 released ViT-S/14, ViT-B/14, ViT-L/14 (518 px, layer scale), each with and without 4 registers"),)
