"""The paper's ImageNet presets: every experiment/paper/* config composes with the paper's hyperparameters and its
modules instantiate and run on a tiny input (queue shrunk for the test only), in 2q and 1q."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from compress_lit.runtime.config import register_configs, validate_train
from compress_lit.teachers import FrozenTeacher
from compress_lit.models import build_backbone
from compress_lit.methods.build import build_method, build_student

CONF = Path(__file__).resolve().parents[1] / "conf"
# the CompReSS presets (the CC baseline's, cc_*, have their own hyperparameters: tests/test_cc_presets.py)
PRESETS = sorted(p.stem for p in (CONF / "experiment" / "paper").glob("*.yaml") if not p.stem.startswith("cc_"))
register_configs()


def _cfg(preset, *extra):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[f"experiment=paper/{preset}", "teacher.checkpoint=/ckpt/t.pth",
                                                       "data.root=/data/imagenet", *extra])


def test_there_are_presets_for_the_papers_pairs():
    assert {"mocov2_r50_to_alexnet", "mocov2_r50_to_resnet18", "mocov2_r50_to_mobilenetv2",
            "simclr_r50x4_to_resnet50", "simclr_r50x4_to_alexnet", "swav_r50_to_resnet18"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_has_the_papers_hyperparameters(preset):
    cfg = _cfg(preset)
    validate_train(cfg)
    m, o, d = cfg.method, cfg.optim, cfg.data
    assert (m.queue_size, m.temperature, m.momentum) == (128_000, 0.04, 0.999)
    assert (o.lr, o.momentum, o.weight_decay, o.epochs, list(o.milestones), o.gamma, o.warmup_epochs) == \
        (0.01, 0.9, 1e-4, 130, [90, 120], 0.2, 0)
    assert (d.name, d.batch_size, d.image_size, d.resize_size, d.hflip, d.root) == \
        ("imagefolder", 256, 224, 256, True, "/data/imagenet")
    assert not cfg.student.small_input and not cfg.teacher.small_input


@pytest.mark.parametrize("method", ["compress_2q", "compress_1q"])
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_modules_instantiate_and_run(preset, method):
    cfg = _cfg(preset, f"method={method}")
    with open_dict(cfg):
        cfg.method.queue_size = 64  # the paper's 128,000 x 8,192 queue would not fit a test
    torch.manual_seed(0)
    teacher = FrozenTeacher(build_backbone(cfg.teacher.arch, small_input=cfg.teacher.small_input))
    module = build_method(cfg, build_student(cfg.student), teacher)
    x = torch.randn(2, 3, 96, 96)
    loss, _ = module.distill(x, module.training_embedding(x), module.teacher_targets(x, torch.arange(2)))
    assert torch.isfinite(loss)
    expected = {"resnet50x4": 8192, "resnet50": 2048}[cfg.teacher.arch]
    assert module.teacher_dim == expected


def test_resnet50_student_has_the_papers_training_head():
    """SimCLR R50x4 -> ResNet-50: the 2048 -> 8192 layer exists in training only; 1q maps 8192 -> 8192 (the official
    1q script crashed here: its head was replaced by a layer of the wrong input size)."""
    cfg = _cfg("simclr_r50x4_to_resnet50", "method=compress_1q", "method.queue_size=16")
    assert cfg.student.train_head_dim == 8192
    teacher = FrozenTeacher(build_backbone("resnet50x4"))
    module = build_method(cfg, build_student(cfg.student), teacher)
    assert (module.train_head.in_features, module.train_head.out_features) == (2048, 8192)
    assert (module.projection.in_features, module.projection.out_features) == (8192, 8192)
    x = torch.randn(2, 3, 64, 64)
    assert module(x).shape == (2, 2048)
    loss, _ = module.distill(x, module.training_embedding(x), module.teacher_targets(x, torch.arange(2)))
    assert torch.isfinite(loss)
