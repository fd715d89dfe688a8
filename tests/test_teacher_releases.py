"""Today's teacher releases (teacher.format = dino, dinov2, mocov3, barlowtwins, vicreg).

Each test writes a checkpoint in the release's real layout — the key names and shapes of the release's own model
definition (facebookresearch/dino vision_transformer.py, dinov2 DinoVisionTransformer, moco-v3 builder.py + vits.py,
the Barlow Twins / VICReg hub backbones), tiny sizes, random weights and BatchNorm statistics — and checks that the
loaded teacher's embedding equals the source model's: a timm VisionTransformer built with the release's config and
loaded the way the release (or timm's own DINOv2 converter) loads it, or a torchvision ResNet-50. The real sizes are
checked against the architecture definitions on the meta device. Wrong prefixes and files of another format fail
naming the keys and the format that does fit.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from compress_lit.runtime.config import TeacherConfig, ViTOptions, teacher_formats
from compress_lit.models import build_backbone
from compress_lit.teachers import CHECKPOINT_FORMATS, TeacherLoadError, build_teacher, load_backbone_state

TINY = dict(embed_dim=32, depth=2, num_heads=2)
CONF = str(Path(__file__).resolve().parents[1] / "conf")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread (conftest.py)


def images(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def vit_cfg(arch, fmt, path, img_size, embedding=None, **sizes) -> TeacherConfig:
    vit = ViTOptions(img_size=img_size, **{**TINY, **sizes})
    return TeacherConfig(name=f"test-{arch}", arch=arch, format=fmt, checkpoint=str(path), embedding=embedding, vit=vit)


# ---- the releases' layouts -----------------------------------------------------------------------------------------
def vit_release_state_dict(dim: int, depth: int, patch: int, grid: int, *, layer_scale=False, registers=0,
                           mask_token=False, seed=0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of DINO's VisionTransformer (``num_classes=0``) / DINOv2's
    DinoVisionTransformer (``block_chunks=0``: ls1/ls2 gamma, mask_token, register_tokens) / MoCo v3's base encoder
    (less its head); the ViT-S/B/L sizes are these with dim 384/768/1024, depth 12/12/24, grid 224/16 or 518/14."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=0.2: scale * torch.randn(*shape, generator=g)  # noqa: E731
    one = lambda n: 1 + r(n, scale=0.1)  # noqa: E731
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim)}
    if registers:
        sd["register_tokens"] = r(1, registers, dim)
    if mask_token:
        sd["mask_token"] = r(1, dim)
    sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = r(dim, 3, patch, patch), r(dim)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": one(dim), b + "norm1.bias": r(dim),
                   b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
                   b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                   b + "norm2.weight": one(dim), b + "norm2.bias": r(dim),
                   b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                   b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim)})
        if layer_scale:
            sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = one(dim), one(dim)
    sd["norm.weight"], sd["norm.bias"] = one(dim), r(dim)
    return sd


def timm_source(sd: dict, *, patch: int, img_size: int, heads: int = 2, layer_scale=False, registers=0,
                dynamic=False) -> VisionTransformer:
    """A timm VisionTransformer with the release's config, loaded from the release's state_dict: DINO / MoCo v3
    strictly as they are, DINOv2 through timm's own converter (``checkpoint_filter_fn``: mask_token dropped,
    registers -> reg_token, the class token's position folded into cls_token)."""
    dim = sd["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    m = VisionTransformer(img_size=img_size, patch_size=patch, num_classes=0, embed_dim=dim, depth=depth,
                          num_heads=heads, qkv_bias=True, init_values=1e-5 if layer_scale else None,
                          reg_tokens=registers, no_embed_class=bool(registers), dynamic_img_size=dynamic)
    m.load_state_dict(checkpoint_filter_fn(dict(sd), m) if "mask_token" in sd else sd, strict=True)
    return m.eval()


def dino_interpolated_forward(src: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """DINO's / DINOv2's forward at another resolution (``prepare_tokens`` with ``interpolate_pos_encoding``:
    bicubic, scale factor (w0 + 0.1) / sqrt(N), no antialiasing), on the source's own modules."""
    b, _, w, h = x.shape
    p = src.patch_embed.patch_size[0]
    t = src.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([src.cls_token.expand(b, -1, -1), t], dim=1)
    n, dim = src.pos_embed.shape[1] - 1, t.shape[-1]
    w0, h0 = w // p + 0.1, h // p + 0.1
    patch_pos = F.interpolate(src.pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim)
                              .permute(0, 3, 1, 2), scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    pos = torch.cat([src.pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    t = src.blocks(t + pos)
    return src.norm(t)[:, 0]


def assert_same(teacher, source_out: torch.Tensor, x: torch.Tensor) -> None:
    got = teacher(x)
    assert got.shape == source_out.shape and teacher.embed_dim == source_out.shape[1]
    torch.testing.assert_close(got, source_out, rtol=1e-5, atol=1e-5)


def randomised_resnet50(seed: int = 1, **kw) -> nn.Module:
    torch.manual_seed(seed)
    m = build_backbone("resnet50", **kw)
    _randomise_bn(m)
    return m.eval()


def _randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
                mod.num_batches_tracked.fill_(11)


def resnet_cfg(fmt, path, **kw) -> TeacherConfig:
    return TeacherConfig(name=f"test-{fmt}", arch="resnet50", format=fmt, checkpoint=str(path), **kw)


def mlp_head(in_dim: int, hidden: int, out: int, layers: int, last_bn_affine: bool, prefix: str) -> dict:
    """MoCo v3's _build_mlp: Linear (no bias), BatchNorm1d, ReLU ..., the last Linear then BatchNorm1d(affine=False)
    (the predictor's last BN too: the ViT recipe), as state_dict entries under ``prefix``."""
    sd, d = {}, in_dim
    for i in range(layers):
        o = out if i == layers - 1 else hidden
        sd[f"{prefix}{3 * i}.weight"] = torch.randn(o, d)
        bn = f"{prefix}{3 * i + 1}."
        if i < layers - 1 or last_bn_affine:
            sd[bn + "weight"], sd[bn + "bias"] = torch.ones(o), torch.zeros(o)
        sd[bn + "running_mean"], sd[bn + "running_var"] = torch.zeros(o), torch.ones(o)
        sd[bn + "num_batches_tracked"] = torch.tensor(5)
        d = o
    return sd


def mocov3_checkpoint(base: dict, arch: str, head_key: str, embed: int) -> dict:
    """main_moco.py's save: {'epoch', 'arch', 'state_dict' (DDP-wrapped MoCo), 'optimizer', 'scaler'}."""
    head = mlp_head(embed, 64, 16, 3 if head_key == "head" else 2, False, f"{head_key}.")
    sd = {f"module.base_encoder.{k}": v for k, v in {**base, **head}.items()}
    sd.update({f"module.momentum_encoder.{k}": v + 1 for k, v in {**base, **head}.items()})  # must be ignored
    sd.update({f"module.predictor.{k}": v for k, v in mlp_head(16, 64, 16, 2, False, "").items()})
    return {"epoch": 300, "arch": arch, "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "weight_decay": 0.1, "params": [0, 1]}]},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 17}}


# ---- the registry --------------------------------------------------------------------------------------------------
def test_every_format_module_is_registered_and_a_choice_of_teacher_format():
    assert {"dino", "dinov2", "mocov3", "barlowtwins", "vicreg", "moco", "swav", "simclr_tf", "simclr_converted",
            "torchvision", "compress_lit"} == set(CHECKPOINT_FORMATS)
    assert teacher_formats() == (*CHECKPOINT_FORMATS, "random", "timm")
    from compress_lit.runtime.config import TEACHER_FORMATS
    from compress_lit.evaluation.settings import MODEL_FORMATS

    assert TEACHER_FORMATS == teacher_formats() and MODEL_FORMATS == ("student", *TEACHER_FORMATS)
    table = (Path(CONF).parent / "docs" / "teachers.md").read_text()
    undocumented = [f for f in teacher_formats() if f"| `{f}` |" not in table]
    assert not undocumented, f"docs/teachers.md's format table lacks {undocumented}"


# ---- the real sizes, from the architecture definitions -------------------------------------------------------------
@pytest.mark.parametrize("arch,dim,depth,heads,patch,tokens,timm_name", [
    ("vit_small_patch16", 384, 12, 6, 16, 197, "vit_small_patch16_224"),
    ("vit_small_patch8", 384, 12, 6, 8, 785, "vit_small_patch8_224"),
    ("vit_base_patch16", 768, 12, 12, 16, 197, "vit_base_patch16_224"),
    ("vit_base_patch8", 768, 12, 12, 8, 785, "vit_base_patch8_224"),
    ("vit_small_patch16_mocov3", 384, 12, 12, 16, 197, None),
    ("vit_tiny_patch16", 192, 12, 3, 16, 197, "vit_tiny_patch16_224"),
    ("vit_small_patch14_dinov2", 384, 12, 6, 14, 1370, "vit_small_patch14_dinov2"),
    ("vit_base_patch14_dinov2", 768, 12, 12, 14, 1370, "vit_base_patch14_dinov2"),
    ("vit_large_patch14_dinov2", 1024, 24, 16, 14, 1370, "vit_large_patch14_dinov2"),
    ("vit_small_patch14_reg4_dinov2", 384, 12, 6, 14, 1370, "vit_small_patch14_reg4_dinov2"),
    ("vit_base_patch14_reg4_dinov2", 768, 12, 12, 14, 1370, "vit_base_patch14_reg4_dinov2"),
    ("vit_large_patch14_reg4_dinov2", 1024, 24, 16, 14, 1370, "vit_large_patch14_reg4_dinov2"),
])
def test_real_vit_sizes_match_the_release_definitions(arch, dim, depth, heads, patch, tokens, timm_name):
    import timm

    with torch.device("meta"):
        ours = build_backbone(arch)
    dinov2, reg = "dinov2" in arch, "reg4" in arch
    grid = int(math.isqrt(tokens - 1))
    want = {k: tuple(v.shape) for k, v in vit_release_state_dict(1, 1, 1, 1, layer_scale=dinov2,
                                                                    registers=4 * reg).items()}
    want = {k.replace("blocks.0.", ""): s for k, s in want.items()}  # per-block names, sizes below
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert len(ours.blocks) == depth and ours.blocks[0].attn.num_heads == heads and ours.embed_dim == dim
    assert got["pos_embed"] == (1, tokens, dim) and ours.grid == (grid, grid)
    assert got["patch_embed.proj.weight"] == (dim, 3, patch, patch)
    assert got["blocks.0.mlp.fc1.weight"] == (4 * dim, dim) and got["blocks.0.attn.qkv.weight"] == (3 * dim, dim)
    assert got.get("register_tokens") == ((1, 4, dim) if reg else None)
    assert ("blocks.0.ls1.gamma" in got) == dinov2 and "mask_token" not in got
    per_block = {k.split(".", 2)[2] for k in got if k.startswith("blocks.0.")}
    assert per_block == {k for k in want if "." in k and not k.startswith(("patch_embed", "norm."))}
    assert {k for k in got if not k.startswith("blocks.")} == \
        {k for k in want if k not in per_block and k != "mask_token"}
    if timm_name is not None:  # timm's definition of the same release (its DINOv2 ones at 518 px)
        with torch.device("meta"):
            ref = timm.create_model(timm_name, pretrained=False, num_classes=0)
        ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        if reg:  # timm keeps the registers' and class token's positions out of pos_embed (no_embed_class)
            ref_shapes["pos_embed"] = (1, tokens, dim)
            ref_shapes["register_tokens"] = ref_shapes.pop("reg_token")
        assert got == ref_shapes


# ---- DINO ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,patch", [("vit_small_patch16", 16), ("vit_small_patch8", 8), ("vit_base_patch16", 16),
                                        ("vit_base_patch8", 8)])
def test_dino_vit_round_trip_and_interpolated_positions(tmp_path, arch, patch):
    grid = 3
    sd = vit_release_state_dict(32, 2, patch, grid)
    path = tmp_path / "dino_pretrain.pth"
    torch.save(sd, path)
    src = timm_source(sd, patch=patch, img_size=grid * patch)
    teacher = build_teacher(vit_cfg(arch, "dino", path, img_size=grid * patch))
    x = images(grid * patch)
    with torch.no_grad():
        assert_same(teacher, src(x), x)
        # other resolutions: the position table interpolated as DINO's interpolate_pos_encoding
        for g in (2, 5):
            y = images(g * patch, seed=g)
            assert_same(teacher, dino_interpolated_forward(src, y), y)
    assert teacher.embed_dim == 32 and teacher.layer_names[-1] == "pool"


def test_dino_resnet50_round_trip(tmp_path):
    src = randomised_resnet50(width_multiplier=0.25, small_input=True)
    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(src.state_dict(), path)  # the hub's resnet50 with fc = Identity: no fc keys
    assert not any(k.startswith("fc.") for k in torch.load(path))
    t = build_teacher(resnet_cfg("dino", path, small_input=True, width_multiplier=0.25))
    x = images(32)
    with torch.no_grad():
        assert_same(t, src(x), x)


# ---- DINOv2 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_round_trip_layer_scale_registers_and_interpolation(tmp_path, registers):
    arch = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    grid, patch = 4, 14  # the released grid is 37 x 37 at 518 px; 4 x 4 at 56 px here
    sd = vit_release_state_dict(32, 2, patch, grid, layer_scale=True, registers=registers, mask_token=True)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    src = timm_source(sd, patch=patch, img_size=grid * patch, layer_scale=True, registers=registers,
                      dynamic=bool(registers))
    teacher = build_teacher(vit_cfg(arch, "dinov2", path, img_size=grid * patch))
    x = images(grid * patch)
    with torch.no_grad():
        assert_same(teacher, src(x), x)
        y = images(2 * patch, seed=3)  # the training resolution: 2 x 2 patches
        if registers:  # DINOv2-reg: bicubic to the size, antialiased = timm's dynamic-size resampling
            assert_same(teacher, src(y), y)
        else:  # DINOv2: bicubic with the 0.1 offset, no antialiasing
            assert_same(teacher, dino_interpolated_forward(src, y), y)
        # mask_token is dropped, the layer scales and registers are the file's
        b = teacher.backbone
        torch.testing.assert_close(b.blocks[1].ls2.gamma, sd["blocks.1.ls2.gamma"], rtol=0, atol=0)
        if registers:
            torch.testing.assert_close(b.register_tokens, sd["register_tokens"], rtol=0, atol=0)


def test_dinov2_other_embeddings(tmp_path):
    grid, patch = 3, 14
    sd = vit_release_state_dict(32, 2, patch, grid, layer_scale=True, registers=4, mask_token=True)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(sd, path)
    src = timm_source(sd, patch=patch, img_size=grid * patch, layer_scale=True, registers=4)
    x = images(grid * patch)
    with torch.no_grad():
        tokens = src.forward_features(x)  # normed: class, 4 registers, patches
        mean = tokens[:, 5:].mean(1)
        for embedding, want in (("mean_patch", mean), ("cls_and_mean", torch.cat([tokens[:, 0], mean], 1))):
            t = build_teacher(vit_cfg("vit_small_patch14_reg4_dinov2", "dinov2", path, grid * patch, embedding))
            assert_same(t, want, x)
            assert t.embed_dim == want.shape[1]


def test_dinov2_file_needs_its_mask_token_and_registers_need_the_reg_arch(tmp_path):
    sd = vit_release_state_dict(32, 2, 14, 2, layer_scale=True, registers=4, mask_token=True)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(sd, path)
    with pytest.raises(TeacherLoadError, match=r"unexpected 1 key: register_tokens") as e:
        build_teacher(vit_cfg("vit_small_patch14_dinov2", "dinov2", path, 28))
    assert str(path) in str(e.value) and "'dinov2'" in str(e.value)
    del sd["mask_token"]
    torch.save(sd, path)
    with pytest.raises(TeacherLoadError, match="no 'mask_token'"):
        build_teacher(vit_cfg("vit_small_patch14_reg4_dinov2", "dinov2", path, 28))


# ---- MoCo v3 -------------------------------------------------------------------------------------------------------
def test_mocov3_vit_round_trip(tmp_path):
    patch, grid = 16, 2
    base = vit_release_state_dict(48, 2, patch, grid, seed=4)
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save(mocov3_checkpoint(base, "vit_small", "head", 48), path)
    # main_lincls.py: keep module.base_encoder.* less the head, then a strict timm VisionTransformer
    sd = torch.load(path)["state_dict"]
    kept = {k[len("module.base_encoder."):]: v for k, v in sd.items()
            if k.startswith("module.base_encoder.") and not k.startswith("module.base_encoder.head.")}
    src = timm_source(kept, patch=patch, img_size=grid * patch, heads=12)  # MoCo v3 ViT-S: 12 heads
    t = build_teacher(vit_cfg("vit_small_patch16_mocov3", "mocov3", path, grid * patch, embed_dim=48, num_heads=12))
    x = images(grid * patch)
    with torch.no_grad():
        assert_same(t, src(x), x)
    # the same weights read as DINO's 6-head ViT-S would load (same shapes) and compute something else: refused
    with pytest.raises(TeacherLoadError, match=r"fits teacher.arch one of .*vit_small_patch16_mocov3.*12 attention"):
        build_teacher(vit_cfg("vit_small_patch16", "mocov3", path, grid * patch, embed_dim=48, num_heads=6))


def test_mocov3_resnet50_round_trip(tmp_path):
    src = randomised_resnet50(width_multiplier=0.25, small_input=True)
    path = tmp_path / "r-50-1000ep.pth.tar"
    torch.save(mocov3_checkpoint(src.state_dict(), "resnet50", "fc", src.embed_dim), path)
    t = build_teacher(resnet_cfg("mocov3", path, small_input=True, width_multiplier=0.25))
    x = images(32)
    with torch.no_grad():
        assert_same(t, src(x), x)


# ---- Barlow Twins and VICReg ---------------------------------------------------------------------------------------
def test_barlowtwins_release_is_torchvision_resnet50_without_fc(tmp_path):
    """The release is torchvision's resnet50(zero_init_residual=True).state_dict() with fc = Identity, full size."""
    torch.manual_seed(2)
    tv = torchvision.models.resnet50(weights=None, zero_init_residual=True)
    _randomise_bn(tv)
    tv.fc = nn.Identity()
    path = tmp_path / "resnet50.pth"
    torch.save(tv.state_dict(), path)
    t = build_teacher(resnet_cfg("barlowtwins", path))
    x = images(64)
    with torch.no_grad():
        assert_same(t, tv.eval()(x), x)
    assert t.embed_dim == 2048


def test_vicreg_release_computes_as_vicregs_padded_stem(tmp_path):
    """VICReg's resnet.py: ConstantPad2d(1) then a 7x7 stride-2 conv with padding 2, no fc; our ResNet-50 (padding
    3) computes the same from the same state_dict."""
    src = randomised_resnet50(width_multiplier=0.25)
    path = tmp_path / "resnet50.pth"
    torch.save(src.state_dict(), path)
    vicreg = randomised_resnet50(seed=9, width_multiplier=0.25)
    vicreg.load_state_dict(torch.load(path))
    old = vicreg.conv1
    conv = nn.Conv2d(old.in_channels, old.out_channels, 7, 2, 2, bias=False)
    conv.weight = old.weight
    vicreg.conv1 = nn.Sequential(nn.ConstantPad2d(1, 0.0), conv)
    t = build_teacher(resnet_cfg("vicreg", path, width_multiplier=0.25))
    x = images(64)
    with torch.no_grad():
        assert_same(t, vicreg.eval()(x), x)


# ---- wrong prefixes and files of another format --------------------------------------------------------------------
def load_error(path, fmt, model) -> str:
    with pytest.raises(TeacherLoadError) as ei:
        load_backbone_state(str(path), fmt, model)
    msg = str(ei.value)
    assert str(path) in msg and repr(fmt) in msg
    return msg


def small_r50():
    return build_backbone("resnet50", small_input=True, width_multiplier=0.25)


def test_mocov3_file_as_barlowtwins_names_the_layout_and_fits_mocov3(tmp_path):
    path = tmp_path / "r-50-1000ep.pth.tar"
    torch.save(mocov3_checkpoint(randomised_resnet50(width_multiplier=0.25, small_input=True).state_dict(),
                                 "resnet50", "fc", 512), path)
    msg = load_error(path, "barlowtwins", small_r50())
    assert "epoch, arch, state_dict" in msg and "fits format 'mocov3'" in msg


def test_barlowtwins_file_as_mocov3_names_the_prefix_and_fits_the_plain_formats(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(randomised_resnet50(width_multiplier=0.25, small_input=True).state_dict(), path)
    msg = load_error(path, "mocov3", small_r50())
    assert "'state_dict' whose keys are 'module.base_encoder.<backbone key>'" in msg
    assert "found a dict with keys conv1.weight" in msg
    assert "fits format 'barlowtwins' / 'dino' / 'torchvision' / 'vicreg'" in msg


def test_mocov3_with_the_moco_v2_prefix_fails(tmp_path):
    ckpt = mocov3_checkpoint(randomised_resnet50(width_multiplier=0.25, small_input=True).state_dict(), "resnet50",
                             "fc", 512)
    ckpt["state_dict"] = {k.replace("module.base_encoder.", "module.encoder_q."): v
                          for k, v in ckpt["state_dict"].items()}
    path = tmp_path / "moco_like.pth.tar"
    torch.save(ckpt, path)
    msg = load_error(path, "mocov3", small_r50())
    assert "no key starts with 'module.base_encoder.'" in msg and "module.encoder_q.conv1.weight" in msg


def test_classifier_file_as_vicreg_names_fc_and_fits_torchvision(tmp_path):
    sd = dict(randomised_resnet50(width_multiplier=0.25, small_input=True).state_dict())
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(sd, path)
    msg = load_error(path, "vicreg", small_r50())
    assert "unexpected 2 keys: fc.weight, fc.bias" in msg and "fits format 'torchvision'" in msg


@pytest.mark.parametrize("fmt", ["dino", "barlowtwins", "vicreg"])
def test_a_ddp_prefixed_backbone_loads_under_the_plain_formats_and_another_prefix_is_named(tmp_path, fmt):
    """A plain release layout has no prefix, so a DataParallel / DDP ``module.`` on every key is unambiguous: it is
    stripped once. Any other prefix (``backbone.``, ``encoder.``) is still a layout the format does not read."""
    src = randomised_resnet50(width_multiplier=0.25, small_input=True)
    path = tmp_path / "wrapped.pth"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)
    model = small_r50()
    load_backbone_state(str(path), fmt, model)
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), src(x), rtol=0, atol=0)
    other = tmp_path / "encoder.pth"
    torch.save({f"encoder.{k}": v for k, v in src.state_dict().items()}, other)
    msg = load_error(other, fmt, small_r50())
    assert "every key starts with ['encoder.']" in msg and "encoder.conv1.weight" in msg


def test_a_ddp_prefixed_dinov2_file_loads(tmp_path):
    sd = vit_release_state_dict(32, 2, 14, 2, layer_scale=True, mask_token=True)
    path = tmp_path / "dinov2_ddp.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    model = build_backbone("vit_small_patch14_dinov2", img_size=28, **TINY)
    load_backbone_state(str(path), "dinov2", model)
    assert torch.equal(model.state_dict()["cls_token"], sd["cls_token"])


def test_dino_and_mocov3_vit_files_are_told_apart(tmp_path):
    dino = tmp_path / "dino_vitbase16_pretrain.pth"
    sd = vit_release_state_dict(32, 2, 16, 2)
    torch.save(sd, dino)
    mocov3 = tmp_path / "vit-b-300ep.pth.tar"
    torch.save(mocov3_checkpoint(sd, "vit_base", "head", 32), mocov3)
    model = build_backbone("vit_base_patch16", img_size=32, **TINY)
    msg = load_error(dino, "mocov3", model)
    assert "'module.base_encoder.<backbone key>'" in msg and "found a dict with keys cls_token, pos_embed" in msg
    assert "fits format 'dino' / 'torchvision' instead" in msg
    msg = load_error(mocov3, "dino", model)
    assert "epoch, arch, state_dict" in msg and "fits format 'mocov3'" in msg


# ---- the hint: other architectures, named by their presets ----------------------------------------------------------
def test_a_dino_vit_file_given_with_a_resnet_arch_names_the_preset_that_reads_it(tmp_path):
    """Real ViT-S/16 sizes (DINO's dino_deitsmall16_pretrain.pth layout): given as a ResNet-50 no format fits with
    that architecture, but the preset dino_vits16 does: the hint names it (not "no other format fits")."""
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save({k: torch.zeros_like(v) for k, v in vit_release_state_dict(384, 12, 16, 14).items()}, path)
    for fmt in ("torchvision", "dino"):  # teacher=torchvision_resnet50 / dino_resnet50 given the ViT file
        msg = load_error(path, fmt, build_backbone("resnet50"))
        assert ("this is a DINO ViT-S/16 file: teacher=dino_vits16 (format 'dino', teacher.arch=vit_small_patch16)"
                in msg), msg
        assert "no other format" not in msg and "fits format" not in msg  # nothing with the ResNet-50 itself


def test_a_mocov3_vits_file_given_as_dino_names_the_12_head_preset(tmp_path):
    """MoCo v3's ViT-S/16 has DINO's weight shapes but 12 heads: as DINO's ViT-S (format dino) its wrapper does not
    fit, mocov3 refuses vit_small_patch16, and the preset that reads it is mocov3_vits (its own 12-head arch)."""
    path = tmp_path / "vit-s-300ep.pth.tar"
    base = {k: torch.zeros_like(v) for k, v in vit_release_state_dict(384, 12, 16, 14).items()}
    torch.save(mocov3_checkpoint(base, "vit_small", "head", 384), path)
    msg = load_error(path, "dino", build_backbone("vit_small_patch16"))
    assert "this is a MoCo v3 ViT-S/16 file: teacher=mocov3_vits (format 'mocov3', " \
           "teacher.arch=vit_small_patch16_mocov3)" in msg


def test_a_file_nothing_reads_says_so_and_a_plain_resnet50_names_every_preset_it_fits(tmp_path):
    path = tmp_path / "junk.pth"
    torch.save({"weight": torch.zeros(3, 3)}, path)
    msg = load_error(path, "torchvision", small_r50())
    assert "no other format fits it with teacher.arch=resnet50, and no teacher preset (conf/teacher/) fits it" in msg
    import torchvision

    tv = torchvision.models.resnet50(weights=None)
    sd = {k: torch.zeros_like(v) for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    plain = tmp_path / "resnet50.pth"
    torch.save(sd, plain)
    msg = load_error(plain, "mocov3", build_backbone("resnet50"))  # a plain ResNet-50 backbone without fc
    assert "fits format 'barlowtwins' / 'dino' / 'torchvision' / 'vicreg' instead" in msg
    for preset in ("barlowtwins_resnet50", "dino_resnet50", "torchvision_resnet50", "vicreg_resnet50"):
        assert f"teacher={preset} (" in msg


# ---- a ViT under a format that reads any file: the head count must be confirmed ------------------------------------
def test_a_vit_s_file_under_torchvision_needs_its_head_count_confirmed(tmp_path):
    """MoCo v3's ViT-S base encoder saved as a plain state_dict (as a user exports it) has exactly DeiT-S's / DINO's
    ViT-S/16 shapes: teacher.format=torchvision cannot tell 6 heads from 12, so it refuses until
    teacher.vit.num_heads says which; with 12 the teacher computes MoCo v3's ViT-S (timm, 12 heads), with 6 not."""
    sd = vit_release_state_dict(384, 12, 16, 14, seed=3)
    path = tmp_path / "mocov3_vits_base_encoder.pth"
    torch.save(sd, path)
    cfg = TeacherConfig(name="t", arch="vit_small_patch16", format="torchvision", checkpoint=str(path))
    with pytest.raises(TeacherLoadError, match=r"confirm it with teacher\.vit\.num_heads=<n>") as e:
        build_teacher(cfg)
    assert "vit_small_patch16_mocov3 (12 heads)" in str(e.value) and "(6 heads)" in str(e.value)
    x = images(32)
    with torch.no_grad():
        want = dino_interpolated_forward(timm_source(sd, patch=16, img_size=224, heads=12), x)  # MoCo v3's ViT-S
    twelve = build_teacher(TeacherConfig(name="t", arch="vit_small_patch16", format="torchvision",
                                         checkpoint=str(path), vit=ViTOptions(num_heads=12)))
    assert_same(twelve, want, x)
    six = build_teacher(TeacherConfig(name="t", arch="vit_small_patch16", format="torchvision", checkpoint=str(path),
                                      vit=ViTOptions(num_heads=6)))
    assert not torch.allclose(six(x), want, atol=1e-3)  # the same file, another function: why it is refused
    # the release formats fix the head count; an architecture no other shares its shapes with needs nothing
    from compress_lit.teachers.loading import heads_problem

    assert heads_problem("dino", "vit_small_patch16", None) is None
    assert heads_problem("torchvision", "vit_small_patch16_mocov3", None) is not None
    assert heads_problem("compress_lit", "vit_small_patch16", None) is not None
    assert heads_problem("torchvision", "vit_base_patch16", None) is None
    assert heads_problem("torchvision", "vit_tiny_patch16", None) is None


def test_validation_requires_the_head_count_at_start_up():
    from hydra import compose, initialize_config_dir

    from compress_lit.runtime.config import ConfigError, register_configs, validate_train

    register_configs()
    base = ["teacher=torchvision_resnet50", "teacher.checkpoint=/x.pth", "teacher.arch=vit_small_patch16",
            "data.image_size=32"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=base)
        confirmed = compose(config_name="train", overrides=[*base, "teacher.vit.num_heads=6"])
    with pytest.raises(ConfigError, match=r"^teacher\.vit\.num_heads is required: teacher\.format=torchvision"):
        validate_train(cfg)
    validate_train(confirmed)


def test_dinov2_file_as_torchvision_names_the_mask_token_and_fits_dinov2(tmp_path):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(vit_release_state_dict(32, 2, 14, 2, layer_scale=True, mask_token=True), path)
    model = build_backbone("vit_small_patch14_dinov2", img_size=28, **TINY)
    msg = load_error(path, "torchvision", model)
    assert "unexpected 1 key: mask_token" in msg and "fits format 'dinov2'" in msg


@pytest.mark.parametrize("fmt,arch", [("dinov2", "vit_small_patch16"), ("dino", "vit_small_patch14_dinov2"),
                                      ("barlowtwins", "resnet18"), ("vicreg", "vit_base_patch16")])
def test_a_format_refuses_an_architecture_it_was_never_released_in(tmp_path, fmt, arch):
    path = tmp_path / "any.pth"
    torch.save({"x": torch.zeros(1)}, path)
    cfg = TeacherConfig(name="t", arch=arch, format=fmt, checkpoint=str(path))
    with pytest.raises(TeacherLoadError, match=rf"format '{fmt}' fits teacher.arch one of .*not '{arch}'"):
        build_teacher(cfg)


def test_validation_names_the_teacher_arch_before_anything_is_built():
    from hydra import compose, initialize_config_dir

    from compress_lit.runtime.config import ConfigError, register_configs, validate_train

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["teacher=mocov3_vits", "teacher.arch=vit_small_patch16",
                                                      "teacher.checkpoint=/x.pth"])
    with pytest.raises(ConfigError, match="teacher.arch='vit_small_patch16' is invalid for teacher.format=mocov3"):
        validate_train(cfg)
    for bad, key in (("teacher.embedding=mean", "teacher.embedding"), ("teacher.vit.num_heads=5", "teacher.vit")):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(config_name="train", overrides=["teacher=mocov3_vits", "teacher.checkpoint=/x.pth", bad])
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_train(cfg)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["teacher.embedding=cls"])  # the demo ResNet-18 teacher
    with pytest.raises(ConfigError, match=r"teacher\.embedding='cls' is invalid .*ViT architectures only"):
        validate_train(cfg)


def test_evaluation_reads_a_vit_teacher_file(tmp_path):
    """`compress_lit.evaluate model_format=dino model.arch=... model.vit.*`: the teacher path of the evaluations."""
    from compress_lit.evaluation.loading import load_model
    from compress_lit.evaluation.settings import ModelSpec

    sd = vit_release_state_dict(32, 2, 16, 2)
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(sd, path)
    spec = OmegaConf.structured(ModelSpec(arch="vit_small_patch16", vit=ViTOptions(img_size=32, **TINY)))
    loaded = load_model(str(path), "dino", spec)
    src = timm_source(sd, patch=16, img_size=32)
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), src(x), rtol=1e-5, atol=1e-5)
        feats = loaded.model.forward_features(x, ("block1", "pool"))
    assert loaded.layer_name(None) == "pool" and feats["block1"].shape == (2, 32, 2, 2)
