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

from compress_lit.runtime.config import TeacherConfig, register_configs
from compress_lit.exporting.convert import export_onnx
from compress_lit.exporting.measure import check_parity
from compress_lit.exporting.run import load_runtime, run_export
from compress_lit.methods import CompReSS
from compress_lit.models import build_backbone
from compress_lit.teachers import FrozenTeacher, build_teacher
from compress_lit.methods.build import build_student

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
    """torchvision's EfficientNet penultimate feature before the classifier: avgpool(features)."""
    return lambda x: torch.flatten(tv.avgpool(tv.features(x)), 1)


def mobilenetv3_head(tv: nn.Module):
    """MobileNetV3-Large's 1280-d feature: avgpool(features), then the classifier's Linear(960, 1280) and Hardswish
    (classifier[0], classifier[1]): what timm's conv_head + act2 compute and SEED / DisCo distil into."""
    return lambda x: tv.classifier[1](tv.classifier[0](torch.flatten(tv.avgpool(tv.features(x)), 1)))


def resnet_pool(tv: nn.Module):
    def f(x):
        x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        return torch.flatten(tv.avgpool(tv.layer4(tv.layer3(tv.layer2(tv.layer1(x))))), 1)
    return f


@pytest.mark.parametrize("arch,make,dim,feature,head", [
    ("mobilenetv3_large", torchvision.models.mobilenet_v3_large, 1280, mobilenetv3_head, ("classifier.3.",)),
    ("mobilenetv3_large_pool", torchvision.models.mobilenet_v3_large, 960, pooled, ("classifier.",)),
    ("efficientnet_b0", torchvision.models.efficientnet_b0, 1280, pooled, ("classifier.",)),
    ("resnet34", torchvision.models.resnet34, 512, resnet_pool, ("fc.",)),
])
def test_torchvision_classifier_gives_the_students_embedding(tmp_path, arch, make, dim, feature, head):
    torch.manual_seed(0)
    tv = randomise_bn(make(weights=None))
    path = tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), path)  # torchvision's files: the classifier's plain state_dict
    ours = build_backbone(arch)
    head = {k for k in tv.state_dict() if k.startswith(head)}  # the ImageNet head: all the file has beyond ours
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


@pytest.mark.parametrize("name,dim", [("mobilenetv3_small_input", 640), ("efficientnet_b0_small", 640),
                                      ("resnet34_small", 128), ("vit_tiny_small", 192)])
def test_small_input_presets_keep_a_spatial_map_to_the_end(name, dim):
    cfg = student_cfg(name)
    m = build_student(cfg).eval()
    assert m.embed_dim == dim
    last_map = [n for n in m.layer_names if n not in ("avgpool", "pool")][-1]  # the last spatial layer
    with torch.no_grad():
        for size in (16, 32):
            f = m.forward_features(torch.randn(2, 3, size, size), (last_map, "pool"))
            assert f["pool"].shape == (2, dim) and torch.isfinite(f["pool"]).all()
            assert f[last_map].shape[-1] == size // (4 if "vit" in name else 8)  # stride 8; ViT patch 4


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
    ("mobilenetv3_large_pool", dict(small_input=True, width_multiplier=0.25), 32),
    ("efficientnet_b0", dict(small_input=True, width_multiplier=0.25), 32),
    ("resnet34", dict(small_input=True, width_multiplier=0.125), 32),
    ("vit_tiny_patch16", dict(small_input=True, embed_dim=48, depth=2, num_heads=3), 32),  # the table's own grid
    ("vit_tiny_patch16", dict(small_input=True, embed_dim=48, depth=2, num_heads=3), 16),  # interpolated
])
def test_students_export_to_onnx_within_the_parity_tolerance(tmp_path, arch, kw, size):
    torch.manual_seed(0)
    m = randomise_bn(build_backbone(arch, **kw))
    if arch == "mobilenetv3_large":  # its 960 -> 1280 layer at unit gain, so that the embedding is not near 0
        with torch.no_grad():
            m.classifier[0].weight.normal_(0, m.classifier[0].in_features ** -0.5)
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


@pytest.mark.parametrize("rate", [0.2, 0.0])
def test_efficientnet_stochastic_depth_follows_the_official_schedules(rate):
    """Block i of 16 is dropped with probability rate x i / 16, on residual blocks only: torchvision's
    stochastic_depth_prob and lukemelas' EfficientNet-PyTorch (SEED's student: drop_connect_rate 0.2 by default,
    ``drop_connect_rate *= idx / len(self._blocks)``, applied when ``id_skip and stride == 1 and in == out``)."""
    from torchvision.ops import StochasticDepth

    m = build_backbone("efficientnet_b0", drop_path=rate)
    blocks = [b for stage in m.features[1:-1] for b in stage]
    assert len(blocks) == 16 and m.drop_path == rate
    for i, b in enumerate(blocks):
        (sd,) = [x for x in b.modules() if isinstance(x, StochasticDepth)]
        assert sd.p == pytest.approx(rate * i / 16) and sd.mode == "row"
    residual = [b.use_res_connect for b in blocks]  # stride 1 and in == out: where the drop can apply
    assert sum(residual) == 9


def test_timm_efficientnet_b0_has_no_stochastic_depth_by_default():
    """DisCo's student is timm's efficientnet_b0(num_classes=128) with no drop_path_rate: its default is 0, so the
    family/disco_* EfficientNet preset sets student.drop_path=0; SEED's (lukemelas') keeps 0.2."""
    import timm

    m = timm.create_model("efficientnet_b0", pretrained=False, num_classes=8)
    assert not [n for n, x in m.named_modules() if type(x).__name__ == "DropPath"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        disco = compose(config_name="train", overrides=["experiment=family/disco_mocov2_r50_to_efficientnet_b0"])
        seed = compose(config_name="train", overrides=["experiment=family/seed_mocov2_r50_to_efficientnet_b0"])
    assert (disco.student.drop_path, seed.student.drop_path) == (0.0, 0.2)
    assert build_student(disco.student).drop_path == 0.0 and build_student(student_cfg("efficientnet_b0")).drop_path \
        == 0.2


def test_drop_path_is_refused_for_other_students():
    from compress_lit.runtime.config import ConfigError, validate_train

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["student=resnet18", "student.drop_path=0.1"])
    with pytest.raises(ConfigError, match=r"student\.drop_path=0\.1 is invalid for student\.arch=resnet18"):
        validate_train(cfg)
    with pytest.raises(ValueError, match="drop_path"):
        build_backbone("resnet18", drop_path=0.1)


def test_mobilenetv3_embedding_is_the_1280_feature_and_the_960_pool_an_explicit_arch():
    m = randomise_bn(build_backbone("mobilenetv3_large"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = m.forward_features(x, ("avgpool", "pool"))
        lin = m.classifier[0]
        a = f["avgpool"]
        want = a @ lin.weight.t() + lin.bias
        want = want * torch.clamp(want + 3, 0, 6) / 6  # Hardswish, written out
        torch.testing.assert_close(f["pool"], want)
        torch.testing.assert_close(m(x), want)
    assert (a.shape[1], m.embed_dim, m.head_prefixes) == (960, 1280, ("classifier.3.",))
    pool = build_backbone("mobilenetv3_large_pool")
    assert pool.embed_dim == 960 and pool.head_prefixes == ("classifier.",) and not hasattr(pool, "classifier")
