"""Today's small students: MobileNetV3-Large, EfficientNet-B0, ResNet-34 (torchvision layouts) and ViT-Tiny/16
(DeiT-Tiny, timm layout).

Each is the library's own network: a torchvision / timm classifier with random weights, saved as their files are,
loads through the torchvision format and our embedding equals the classifier's penultimate feature (the documented
embedding). The small-input presets run on 16-32 px images, and each student exports to ONNX within the export's
parity check (a ViT at another size than its position table's: the interpolated table becomes a constant).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from compress_lit.config import TeacherConfig, register_configs
from compress_lit.export import check_parity, export_onnx, load_runtime, run_export
from compress_lit.methods import CompReSS
from compress_lit.models import build_backbone
from compress_lit.teachers import FrozenTeacher, build_teacher
from compress_lit.train import build_student

CONF = str(Path(__file__).resolve().parents[1] / "conf")
register_configs()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread (conftest.py)


def randomise_bn(model: nn.Module, seed: int = 3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def pooled(tv: nn.Module):
    """torchvision's MobileNetV3 / EfficientNet penultimate feature before the classifier: avgpool(features)."""
    return lambda x: torch.flatten(tv.avgpool(tv.features(x)), 1)


def resnet_pool(tv: nn.Module):
    def f(x):
        x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        return torch.flatten(tv.avgpool(tv.layer4(tv.layer3(tv.layer2(tv.layer1(x))))), 1)
    return f


@pytest.mark.parametrize("arch,make,dim,feature", [
    ("mobilenetv3_large", torchvision.models.mobilenet_v3_large, 960, pooled),
    ("efficientnet_b0", torchvision.models.efficientnet_b0, 1280, pooled),
    ("resnet34", torchvision.models.resnet34, 512, resnet_pool),
])
def test_torchvision_classifier_gives_the_students_embedding(tmp_path, arch, make, dim, feature):
    torch.manual_seed(0)
    tv = randomise_bn(make(weights=None))
    path = tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), path)  # torchvision's files: the classifier's plain state_dict
    ours = build_backbone(arch)
    head = {k for k in tv.state_dict() if k.startswith(("classifier.", "fc."))}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in tv.state_dict().items() if k not in head}  # the same trunk, names and sizes
    t = build_teacher(TeacherConfig(name=arch, arch=arch, format="torchvision", checkpoint=str(path)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = feature(tv)(x)
        torch.testing.assert_close(t(x), want, rtol=1e-5, atol=1e-5)
    assert t.embed_dim == dim == want.shape[1]


def test_deit_tiny_classifier_gives_the_vit_tiny_embedding(tmp_path):
    import timm

    torch.manual_seed(0)
    deit = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()  # DeiT-Tiny: head 192 -> 1000
    path = tmp_path / "deit_tiny.pth"
    torch.save(deit.state_dict(), path)
    t = build_teacher(TeacherConfig(name="vit_tiny", arch="vit_tiny_patch16", format="torchvision",
                                    checkpoint=str(path)))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(t(x), deit.forward_head(deit.forward_features(x), pre_logits=True),
                                   rtol=1e-5, atol=1e-5)
    assert t.embed_dim == 192


def student_cfg(name: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=[f"student={name}"]).student


@pytest.mark.parametrize("name,dim", [("mobilenetv3_small_input", 480), ("efficientnet_b0_small", 640),
                                      ("resnet34_small", 128), ("vit_tiny_small", 192)])
def test_small_input_presets_keep_a_spatial_map_to_the_end(name, dim):
    cfg = student_cfg(name)
    m = build_student(cfg).eval()
    assert m.embed_dim == dim
    with torch.no_grad():
        for size in (16, 32):
            f = m.forward_features(torch.randn(2, 3, size, size), (m.layer_names[-2], "pool"))
            assert f["pool"].shape == (2, dim) and torch.isfinite(f["pool"]).all()
            assert f[m.layer_names[-2]].shape[-1] == size // (4 if "vit" in name else 8)  # stride 8; ViT patch 4


@pytest.mark.parametrize("name,vit", [("mobilenetv3", {}), ("efficientnet_b0", {}), ("resnet34", {}),
                                      ("vit_tiny", {}), ("mobilenetv3_small_input", {}),
                                      ("efficientnet_b0_small", {}), ("resnet34_small", {}),
                                      ("vit_tiny_small", {"embed_dim": 48, "depth": 2, "num_heads": 3})])
def test_student_presets_build(name, vit):
    cfg = student_cfg(name)
    cfg.vit = OmegaConf.merge(cfg.vit, vit)
    m = build_student(cfg)
    assert m.arch_name == cfg.arch and m.embed_dim > 0


@pytest.mark.parametrize("arch,kw,size", [
    ("mobilenetv3_large", dict(small_input=True, width_multiplier=0.25), 32),
    ("efficientnet_b0", dict(small_input=True, width_multiplier=0.25), 32),
    ("resnet34", dict(small_input=True, width_multiplier=0.125), 32),
    ("vit_tiny_patch16", dict(small_input=True, embed_dim=48, depth=2, num_heads=3), 32),  # the table's own grid
    ("vit_tiny_patch16", dict(small_input=True, embed_dim=48, depth=2, num_heads=3), 16),  # interpolated
])
def test_students_export_to_onnx_within_the_parity_tolerance(tmp_path, arch, kw, size):
    torch.manual_seed(0)
    m = randomise_bn(build_backbone(arch, **kw))
    example = torch.randn(1, 3, size, size)
    _, notes = export_onnx(m, example, tmp_path / "s.onnx", exporter="legacy")
    assert bool(notes) == (arch.startswith("vit") and size == 16)  # the position table fixed for 16 px
    inputs = [(f"random batch {b}", torch.randn(b, 3, size, size)) for b in (1, 3)]
    parity = check_parity(m, load_runtime("onnx", tmp_path / "s.onnx", 1), inputs, 1e-4)
    assert parity["passed"] and parity["output_scale"] > 0.1, parity


def test_vit_student_checkpoint_exports_with_its_vit_teacher_in_the_report(tmp_path):
    """compress_lit.export on a distilled ViT-Tiny student (student.vit.* in the checkpoint's config) whose teacher is
    a DINO-layout ViT: both rebuilt from the recorded options, the report times both."""
    student_node = {"name": "vit_tiny_small", "arch": "vit_tiny_patch16", "small_input": True, "width_multiplier": None,
                    "fc_dim": None, "vit": {"embed_dim": 48, "depth": 2, "num_heads": 3}}
    teacher_node = {"name": "dino_tiny", "arch": "vit_small_patch16", "format": "dino",
                    "checkpoint": str(tmp_path / "absent.pth"), "embedding": "cls_and_mean",
                    "vit": {"patch_size": 4, "img_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}}
    data = {"name": "digits", "image_size": 16, "in_channels": 3, "mean": [0.305] * 3, "std": [0.376] * 3}
    torch.manual_seed(0)
    student = build_student(OmegaConf.create(student_node))
    teacher = FrozenTeacher(build_teacher(OmegaConf.merge(OmegaConf.structured(TeacherConfig), {
        **teacher_node, "format": "random"})).backbone)
    optim = OmegaConf.create({"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "epochs": 1, "scheduler": "constant",
                              "milestones": [], "gamma": 0.1, "warmup_epochs": 0})
    config = {"student": student_node, "teacher": teacher_node, "data": data, "method": {"name": "compress_2q"}}
    module = CompReSS(student, teacher, optim, queue_size=16, config=config)
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("teacher.")}
    ckpt = tmp_path / "vit.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"config": config}, "epoch": 0}, ckpt)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"checkpoint={ckpt}", "latency.runs=2", "latency.warmup=1",
                                                       "parity.real_inputs=2", "onnx_exporter=legacy"])
    rep = run_export(cfg, tmp_path / "run")
    assert rep["parity"]["passed"] and rep["output_dim"] == 48 and rep["input_shape"] == [1, 3, 16, 16]
    s, t = rep["models"]
    assert s["arch"] == "vit_tiny_patch16" and t["arch"] == "vit_small_patch16"
    assert rep["teacher_note"].startswith("random weights") and t["params"] > 0
    # the student's 8x8 position table (32 px) interpolated once to the 4x4 grid of the 16 px export
    assert [n for n in rep["graph_rewrites"] if n.startswith("pos_embed: the 8x8 position table")]
