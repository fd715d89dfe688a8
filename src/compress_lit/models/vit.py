"""Vision Transformers built from timm's modules, in the key layout of the DINO, DINOv2, MoCo v3 and DeiT releases.

The patch embedding, the transformer blocks (``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``norm2``,
``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``) and the final ``norm`` are timm's (``timm.models.vision_transformer``), so
the state_dict reads exactly as the releases': ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1 + N, D) with the class
token's position first, ``patch_embed.proj.*``, ``blocks.<i>.*``, ``norm.*`` and, for DINOv2 with registers,
``register_tokens`` (1, R, D). Only the token assembly is ours, to follow the releases' own forward:

* position embeddings are stored at the release's grid (DINO / MoCo v3 / DeiT: 224 px; DINOv2: 518 px, 37 x 37
  patches) and interpolated at run time to the input's grid, as DINO and DINOv2 do in ``interpolate_pos_encoding``:
  ``"offset"`` (DINO, DINOv2 without registers, and our choice for MoCo v3, whose code has no interpolation):
  bicubic with scale factor ``(grid + 0.1) / M``, no antialiasing; ``"antialias"`` (DINOv2 with registers):
  bicubic to the size, antialiased. At the release's own grid the stored table is used as it is.
* DINOv2's registers are inserted after the class token *after* the position embedding is added (they have no
  position); its ``mask_token`` (used only in training) is not part of the model.

The embedding (``embedding``): ``cls``, the class token after the final norm (what DINO, DINOv2 and MoCo v3
evaluate with k-NN and the linear probe; DeiT's classifier input); ``mean_patch``, the mean of the normed patch
tokens (registers excluded); ``cls_and_mean``, both concatenated (2 D wide: DINOv2's linear-probe feature).
``forward_features`` also returns ``block<i>``: block i's normed patch tokens as a ``B x D x h x w`` map (the
evaluations average-pool it).

``small_input``: a 4-pixel patch at 32 px (an 8 x 8 grid) instead of the release's patch; the sizes can also be
set one by one (``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``img_size``: ``student.vit.*`` /
``teacher.vit.*``), which is how the tests build tiny models in the releases' layouts.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

EMBEDDINGS = ("cls", "mean_patch", "cls_and_mean")
POS_INTERPOLATIONS = ("offset", "antialias")
SMALL_INPUT = {"patch_size": 4, "img_size": 32}


@dataclass(frozen=True)
class ViTSpec:
    """One architecture: patch size, width, depth, heads, the grid its position table was trained at (img_size /
    patch_size), layer scale (DINOv2), register tokens and the position interpolation rule."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int = 224
    layer_scale: bool = False
    registers: int = 0
    pos_interpolation: str = "offset"


_DINOV2 = dict(img_size=518, layer_scale=True)
_REG4 = dict(registers=4, pos_interpolation="antialias")
VIT_SPECS: dict[str, ViTSpec] = {
    # DeiT-Tiny (timm vit_tiny_patch16_224): the small ViT student, 192-d
    "vit_tiny_patch16": ViTSpec(16, 192, 12, 3),
    # DINO ViT-S/16, ViT-S/8, ViT-B/16, ViT-B/8 (vision_transformer.py vit_small / vit_base); ViT-B/16 is also
    # MoCo v3's ViT-B (12 heads either way)
    "vit_small_patch16": ViTSpec(16, 384, 12, 6),
    "vit_small_patch8": ViTSpec(8, 384, 12, 6),
    "vit_base_patch16": ViTSpec(16, 768, 12, 12),
    "vit_base_patch8": ViTSpec(8, 768, 12, 12),
    # MoCo v3's ViT-S (vits.py vit_small): 12 heads of 32, where DINO's has 6 of 64 (the same weight shapes)
    "vit_small_patch16_mocov3": ViTSpec(16, 384, 12, 12),
    # DINOv2 ViT-S/14, B/14, L/14 (hub backbones: 518 px, layer scale), with and without 4 registers
    "vit_small_patch14_dinov2": ViTSpec(14, 384, 12, 6, **_DINOV2),
    "vit_base_patch14_dinov2": ViTSpec(14, 768, 12, 12, **_DINOV2),
    "vit_large_patch14_dinov2": ViTSpec(14, 1024, 24, 16, **_DINOV2),
    "vit_small_patch14_reg4_dinov2": ViTSpec(14, 384, 12, 6, **_DINOV2, **_REG4),
    "vit_base_patch14_reg4_dinov2": ViTSpec(14, 768, 12, 12, **_DINOV2, **_REG4),
    "vit_large_patch14_reg4_dinov2": ViTSpec(14, 1024, 24, 16, **_DINOV2, **_REG4),
}
OVERRIDABLE = ("patch_size", "embed_dim", "depth", "num_heads", "img_size")


def resolve_spec(spec: ViTSpec, small_input: bool = False, **overrides: Optional[int]) -> ViTSpec:
    """``spec`` with the small-input patch / size, then every override that is not None, applied; checked."""
    if small_input:
        spec = replace(spec, **SMALL_INPUT)
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown ViT option(s) {unknown}; choose from {list(OVERRIDABLE)}")
    spec = replace(spec, **{k: int(v) for k, v in overrides.items() if v is not None})
    for k in OVERRIDABLE:
        if getattr(spec, k) <= 0:
            raise ValueError(f"ViT {k}={getattr(spec, k)} must be > 0")
    if spec.embed_dim % spec.num_heads:
        raise ValueError(f"ViT embed_dim={spec.embed_dim} is not divisible by num_heads={spec.num_heads}")
    if spec.img_size % spec.patch_size:
        raise ValueError(f"ViT img_size={spec.img_size} is not a multiple of patch_size={spec.patch_size}")
    return spec


class ViT(nn.Module):
    """A ViT backbone returning its embedding (``embed_dim`` wide: D, or 2 D for ``cls_and_mean``)."""

    head_prefixes = ("head.",)  # a classifier's head (timm / DeiT), never part of the embedding

    def __init__(self, spec: ViTSpec, small_input: bool = False, in_channels: int = 3, embedding: str = "cls",
                 num_classes: int | None = None, width_multiplier: float | None = None, **overrides: Optional[int]):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if width_multiplier is not None:
            raise ValueError("width_multiplier does not apply to a ViT: set vit.embed_dim (and vit.num_heads)")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"ViT embedding={embedding!r}: choose one of {list(EMBEDDINGS)}")
        spec = resolve_spec(spec, small_input, **overrides)
        if spec.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(f"ViT pos_interpolation={spec.pos_interpolation!r}: choose one of {POS_INTERPOLATIONS}")
        self.spec = spec
        net = VisionTransformer(img_size=spec.img_size, patch_size=spec.patch_size, in_chans=in_channels,
                                num_classes=0, global_pool="token", embed_dim=spec.embed_dim, depth=spec.depth,
                                num_heads=spec.num_heads, mlp_ratio=4.0, qkv_bias=True,
                                init_values=1e-5 if spec.layer_scale else None,
                                dynamic_img_size=True)  # patch_embed: NHWC output, any size divisible by the patch
        self.cls_token = net.cls_token
        self.pos_embed = net.pos_embed
        self.register_tokens = None
        if spec.registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, spec.registers, spec.embed_dim))
            nn.init.normal_(self.register_tokens, std=1e-6)
        self.patch_embed = net.patch_embed
        self.blocks = net.blocks
        self.norm = net.norm
        self.grid = tuple(int(g) for g in self.patch_embed.grid_size)
        self.token_dim = spec.embed_dim
        self.embedding = embedding
        self.embed_dim = spec.embed_dim * (2 if embedding == "cls_and_mean" else 1)
        self.layer_names = tuple(f"block{i + 1}" for i in range(spec.depth)) + ("pool",)
        self.fc = nn.Linear(self.embed_dim, num_classes) if num_classes else None

    # ---- tokens ----------------------------------------------------------------------------------------------
    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """The (1, 1 + h w, D) position table for an ``h x w`` patch grid (class token's position first)."""
        gh, gw = self.grid
        if (h, w) == (gh, gw):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = patch_pos.shape[-1]
        grid = patch_pos.float().reshape(1, gh, gw, d).permute(0, 3, 1, 2)
        if self.spec.pos_interpolation == "offset":
            grid = F.interpolate(grid, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic",
                                 align_corners=False)
        else:
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        if tuple(grid.shape[-2:]) != (h, w):
            raise RuntimeError(f"position interpolation gave a {tuple(grid.shape[-2:])} grid, expected {(h, w)}")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, d).to(cls_pos.dtype)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def for_input_size(self, height: int, width: int) -> tuple["ViT", str | None]:
        """For a fixed input size (an export): a copy whose position table is already interpolated to that grid, so
        the graph holds a constant instead of a bicubic resize (same numbers); ``self`` when no interpolation is
        needed. Returns the model and a note (None when unchanged)."""
        import copy

        p = self.spec.patch_size
        h, w = height // p, width // p
        if (h, w) == self.grid:
            return self, None
        with torch.no_grad():
            table = self.position_embedding(h, w).detach().clone()
        model = copy.deepcopy(self)
        model.pos_embed = nn.Parameter(table, requires_grad=self.pos_embed.requires_grad)
        model.grid = (h, w)
        return model, (f"pos_embed: the {self.grid[0]}x{self.grid[1]} position table interpolated once to the "
                       f"{h}x{w} grid of {height}x{width} px (a constant in the graph)")

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``B x (1 + R + h w) x D`` tokens before the blocks (class, registers, patches), and the grid h, w."""
        x = self.patch_embed(x)  # B h w D
        b, h, w, d = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, d)], dim=1)
        x = x + self.position_embedding(h, w).to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        return x, h, w

    def pool(self, normed: torch.Tensor) -> torch.Tensor:
        """The embedding of the normed tokens."""
        if self.embedding == "cls":
            return normed[:, 0]
        mean = normed[:, 1 + self.spec.registers:].mean(dim=1)
        return mean if self.embedding == "mean_patch" else torch.cat([normed[:, 0], mean], dim=1)

    # ---- the backbone interface -----------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, layers: Sequence[str] = ("pool",)) -> dict[str, torch.Tensor]:
        unknown = [n for n in layers if n not in self.layer_names]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown} for {type(self).__name__}; choose from "
                             f"block1..block{self.spec.depth}, pool")
        depth = len(self.blocks)
        last = depth - 1 if "pool" in layers else max((self.layer_names.index(n) for n in layers), default=-1)
        out: dict[str, torch.Tensor] = {}
        x, h, w = self.tokens(x)
        for i, blk in enumerate(self.blocks):
            if i > last:
                break
            x = blk(x)
            name = f"block{i + 1}"
            if name in layers:
                patches = self.norm(x)[:, 1 + self.spec.registers:]
                out[name] = patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        if "pool" in layers:
            out["pool"] = self.pool(self.norm(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _, _ = self.tokens(x)
        x = self.blocks(x)
        return self.pool(self.norm(x))


def vit_constructor(name: str):
    """The constructor of the architecture ``name`` of :data:`VIT_SPECS`."""
    spec = VIT_SPECS[name]

    def build(**kw) -> ViT:
        return ViT(spec, **kw)

    build.__name__ = name
    return build


__all__ = ["EMBEDDINGS", "OVERRIDABLE", "ViT", "ViTSpec", "VIT_SPECS", "resolve_spec", "vit_constructor"]
