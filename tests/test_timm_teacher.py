"""``teacher=timm``: a teacher by its timm name, offline. Each test builds a small timm model with random weights (and
random BatchNorm statistics), saves its state_dict as the user's local file (``.safetensors`` / ``.pth``), loads it
through ``teacher=timm teacher.checkpoint=...`` with the Hugging Face hub offline, and compares the teacher's
embedding with the source model's own computation: timm's pre-logits feature (CNNs), the class token after the
final norm / the mean patch token (ViTs)."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from compress_lit.runtime.config import ConfigError, TeacherConfig, register_configs, validate_train
from compress_lit.teachers import TeacherLoadError, build_teacher

CONF = str(Path(__file__).resolve().parents[1] / "conf")
register_configs()
pytestmark = pytest.mark.usefixtures("one_thread")  # small networks: one thread (conftest.py)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network: the hub is offline (the environment variable, and the constant huggingface_hub read at import),
    and its cache an empty folder."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))


def randomised(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(0.1 * torch.randn(mod.num_features, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(mod.num_features, generator=g))
    return m.eval()


def save(model: nn.Module, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


def cfg(name, path=None, embedding=None) -> TeacherConfig:
    return TeacherConfig(name=name, arch="timm", format="timm", checkpoint=None if path is None else str(path),
                         embedding=embedding)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_timm_cnn_from_a_local_file_gives_its_pre_logits_feature(tmp_path, suffix):
    src = randomised("resnet18")
    path = save(src, tmp_path / f"model{suffix}")
    t = build_teacher(cfg("resnet18.a1_in1k", path))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = src.forward_head(src.forward_features(x), pre_logits=True)  # the pooled 512-d feature
        want_by_hand = src.forward_features(x).mean((2, 3))
    got = t(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, want_by_hand)
    assert t.embed_dim == 512 and t.backbone.arch_name == "timm"
    t.assert_frozen()


def test_a_timm_vit_from_a_local_file_gives_the_class_token_and_the_mean_patch(tmp_path):
    src = randomised("vit_tiny_patch16_224")
    path = save(src, tmp_path / "model.safetensors")
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = src.forward_features(x)  # B x (1 + 196) x 192, after the final norm
    cls, mean = tokens[:, 0], tokens[:, 1:].mean(1)
    for embedding, want, dim in ((None, cls, 192), ("cls", cls, 192), ("mean_patch", mean, 192),
                                 ("cls_and_mean", torch.cat([cls, mean], 1), 384)):
        t = build_teacher(cfg(name, path, embedding))
        torch.testing.assert_close(t(x), want, rtol=1e-5, atol=1e-5)
        assert t.embed_dim == dim
    torch.testing.assert_close(cls, src.forward_head(tokens, pre_logits=True))  # timm's own feature (token pool)
    small = build_teacher(cfg(name, path))(torch.randn(1, 3, 32, 32))  # another size: timm resamples its positions
    assert small.shape == (1, 192) and torch.isfinite(small).all()


def test_a_file_of_another_model_or_none_offline_is_an_error_naming_it(tmp_path):
    path = save(randomised("resnet18"), tmp_path / "resnet18.pth")
    with pytest.raises(TeacherLoadError, match=r"the weights from .*resnet18\.pth do not fit timm's resnet34.*"
                                               r"Missing key"):
        build_teacher(cfg("resnet34.a1_in1k", path))
    with pytest.raises(TeacherLoadError, match=r"teacher checkpoint .*nope\.pth' \(format 'timm'.*no such file"):
        build_teacher(cfg("resnet18.a1_in1k", tmp_path / "nope.pth"))
    with pytest.raises(TeacherLoadError, match=r"no weights from the Hugging Face cache / hub.*HF_HUB_OFFLINE=1"):
        build_teacher(cfg("resnet18.a1_in1k"))  # offline, with an empty cache
    with pytest.raises(TeacherLoadError, match=r"teacher\.embedding='cls' applies to ViT models only"):
        build_teacher(cfg("resnet18.a1_in1k", path, "cls"))


def train_cfg(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_the_timm_preset_validates_at_start_up():
    validate_train(train_cfg("teacher=timm", "teacher.name=resnet18.a1_in1k"))  # no checkpoint: the HF cache
    validate_train(train_cfg("teacher=timm", "teacher.name=vit_small_patch14_dinov2.lvd142m", "data.image_size=56"))
    for overrides, message in (
            ([], "teacher.name is required: teacher=timm needs teacher.name=<timm model>.<pretrained tag>"),
            (["teacher.name=resnet_nonesuch"], "teacher.name='resnet_nonesuch' is invalid: 'resnet_nonesuch' is not "
                                               "a timm model name"),
            (["teacher.name=resnet18.a1_in1k", "teacher.embedding=cls"],
             "teacher.embedding='cls' is invalid for teacher.name=resnet18.a1_in1k: it applies to ViT models only"),
            (["teacher.name=vit_small_patch14_dinov2.lvd142m"],  # 14-px patches on the digits' 16 px
             "data.image_size=16 is not a multiple of the patch size of teacher.name=vit_small_patch14_dinov2.lvd142m "
             "(timm; patch 14 px)"),
            (["teacher.name=resnet18.a1_in1k", "teacher.arch=resnet18"], "teacher.format=timm with teacher.arch="
                                                                         "resnet18: a timm teacher takes both")):
        with pytest.raises(ConfigError) as e:
            validate_train(train_cfg("teacher=timm", *overrides))
        assert str(e.value).startswith(message), str(e.value)


def test_evaluate_scores_a_timm_model_from_its_file(tmp_path):
    """`compress_lit.evaluate model_format=timm model.arch=timm model.name=... checkpoint=<file>`."""
    from compress_lit.evaluate import run_evaluate

    path = save(randomised("resnet18"), tmp_path / "model.safetensors")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"checkpoint={path}", "model_format=timm", "model.arch=timm", "model.name=resnet18.a1_in1k",
            "data=digits", "data.val_subset=100", "eval=[knn]", "knn.backend=torch", "cache=false", "progress=false"])
    res = run_evaluate(cfg, tmp_path / "ev")
    assert res["num_val"] == 100 and 0 <= res["knn"]["top1_k1"] <= 100
