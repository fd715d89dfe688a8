"""The presets for today's teacher -> student pairs (conf/experiment/*.yaml, beside the paper's in paper/): each
composes with the paper's CompReSS recipe, validates, and its modules instantiate at their real sizes (random
weights; queue shrunk for the test) and run on a small input; every teacher group of a release format composes
and builds its architecture."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from compress_lit.runtime.config import register_configs, validate_train
from compress_lit.models import build_from_config
from compress_lit.teachers import FrozenTeacher
from compress_lit.methods.build import build_method, build_student

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = {  # preset: (teacher arch, teacher embed dim, student arch, student embed dim, patch: input a multiple)
    "dinov2_vitb14_to_mobilenetv3": ("vit_base_patch14_dinov2", 768, "mobilenetv3_large", 1280, 14),
    "dino_vits16_to_resnet18": ("vit_small_patch16", 384, "resnet18", 512, 16),
    "mocov3_vitb_to_efficientnet_b0": ("vit_base_patch16", 768, "efficientnet_b0", 1280, 16),
    "barlowtwins_r50_to_resnet18": ("resnet50", 2048, "resnet18", 512, 32),
}
register_configs()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread (conftest.py)


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=["teacher.checkpoint=/ckpt/t.pth", "data.root=/data/imagenet",
                                                       *overrides])


def test_the_presets_are_top_level_and_documented():
    top = {p.stem for p in (CONF / "experiment").glob("*.yaml")}
    assert set(PRESETS) <= top
    for name in PRESETS:
        text = (CONF / "experiment" / f"{name}.yaml").read_text()
        assert "Why this pair" in text and "override /teacher" in text


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_composes_validates_and_runs(preset):
    t_arch, t_dim, s_arch, s_dim, patch = PRESETS[preset]
    cfg = _cfg(f"experiment={preset}")
    validate_train(cfg)
    m, o, d = cfg.method, cfg.optim, cfg.data
    assert (m.name, m.queue_size, m.temperature, m.momentum) == ("compress_2q", 128_000, 0.04, 0.999)
    assert (o.lr, o.epochs, list(o.milestones)) == (0.01, 130, [90, 120])
    assert (d.name, d.image_size, d.root) == ("imagefolder", 224, "/data/imagenet") and d.image_size % patch == 0
    assert (cfg.teacher.arch, cfg.student.arch) == (t_arch, s_arch)
    with open_dict(cfg):
        cfg.method.queue_size = 64
    torch.manual_seed(0)
    teacher = FrozenTeacher(build_from_config(cfg.teacher))
    module = build_method(cfg, build_student(cfg.student), teacher)
    assert module.teacher_dim == t_dim and module.student_dim == s_dim
    x = torch.randn(2, 3, 4 * patch, 4 * patch)  # a small input: the ViT teachers interpolate their positions
    loss, _ = module.distill(x, module.training_embedding(x), module.teacher_targets(x, torch.arange(2)))
    assert torch.isfinite(loss)


TEACHER_GROUPS = sorted(p.stem for p in (CONF / "teacher").glob("*.yaml")
                        if p.stem.startswith(("dino", "mocov3", "barlowtwins", "vicreg")))


@pytest.mark.parametrize("group", TEACHER_GROUPS)
def test_release_teacher_groups_compose_and_build(group):
    cfg = _cfg(f"teacher={group}", "data=imagenet")
    validate_train(cfg)
    assert cfg.teacher.format in ("dino", "dinov2", "mocov3", "barlowtwins", "vicreg")
    with torch.device("meta"):  # the real sizes, nothing allocated
        model = build_from_config(cfg.teacher)
    assert model.arch_name == cfg.teacher.arch and model.embed_dim in (384, 768, 1024, 2048)
