"""Paper conformance: every `experiment=paper/*` (training) and `pretrain_experiment=paper/*` (pretraining) preset,
composed as a user runs it, against a table of the paper's settings transcribed from docs/paper.md (the paper and the
official scripts). Any drift fails naming the preset and the key; a new preset without a row here fails too."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from compress_lit.runtime.config import validate_pretrain, validate_train
from compress_lit.runtime.distributed import plan_batch
from compress_lit.train import CONF_DIR

# ---- the paper's settings (docs/paper.md) ---------------------------------------------------------------------
IMAGENET_DATA = {  # RandomResizedCrop(224) with torchvision's default scale + flip; eval Resize 256 + CenterCrop 224
    "data.name": "imagefolder", "data.image_size": 224, "data.resize_size": 256, "data.crop_scale": [0.08, 1.0],
    "data.hflip": True, "data.color_jitter": 0.0, "data.batch_size": 256,  # the global batch of one node
    "data.mean": [0.485, 0.456, 0.406], "data.std": [0.229, 0.224, 0.225],
}
COMPRESS_OPTIM = {  # SGD lr 0.01 (m 0.9, wd 1e-4), 130 epochs, x0.2 after 90 and 120, no warm-up, no lr scaling
    "optim.lr": 0.01, "optim.momentum": 0.9, "optim.weight_decay": 1e-4, "optim.epochs": 130,
    "optim.scheduler": "multistep", "optim.milestones": [90, 120], "optim.gamma": 0.2, "optim.warmup_epochs": 0,
    "optim.nesterov": False, "optim.bn_weight_decay": True, "optim.lr_scaling": "none",
}
COMPRESS_2Q = {  # queue 128,000, T 0.04 for both, momentum student m 0.999
    "method.name": "compress_2q", "method.queue_size": 128_000, "method.temperature": 0.04,
    "method.student_temperature": None, "method.momentum": 0.999, "method.use_momentum_encoder": True,
    "method.one_queue": False, "method.queue_dtype": "float32",
}
CC = {  # k-means with 16,000 clusters; cosine lr 0.1, 100 epochs, Nesterov, no weight decay on BatchNorm
    "method.name": "cc", "method.cc_clusters": 16_000, "method.cc_kmeans_iters": 20,
    "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 1e-4, "optim.epochs": 100,
    "optim.scheduler": "cosine", "optim.warmup_epochs": 0, "optim.nesterov": True, "optim.bn_weight_decay": False,
    "optim.lr_scaling": "none",
}
TEACHERS = {
    "mocov2_r50": {"teacher.arch": "resnet50", "teacher.format": "moco", "teacher.cached": False},
    "swav_r50": {"teacher.arch": "resnet50", "teacher.format": "swav", "teacher.cached": False},
    # SimCLR R50x4 as released with CompReSS; the AlexNet student was trained from its cached centre-crop features
    "simclr_r50x4": {"teacher.arch": "resnet50x4", "teacher.format": "simclr_tf"},
    "simclr_r50x4_cached": {"teacher.arch": "resnet50x4", "teacher.format": "simclr_tf", "teacher.cached": True,
                            "teacher.cache_views": 1},
}
STUDENTS = {  # full-size students; AlexNet without dropout; the ResNet-50 student's 2048->8192 training head
    "alexnet": {"student.arch": "alexnet", "student.small_input": False, "student.dropout": 0.0,
                "student.fc_dim": None, "student.width_multiplier": None, "student.train_head_dim": None},
    "resnet18": {"student.arch": "resnet18", "student.small_input": False, "student.width_multiplier": None,
                 "student.train_head_dim": None},
    "mobilenetv2": {"student.arch": "mobilenetv2", "student.small_input": False, "student.width_multiplier": None,
                    "student.train_head_dim": None},
    "resnet50": {"student.arch": "resnet50", "student.small_input": False, "student.width_multiplier": None,
                 "student.train_head_dim": 8192},
}


def compress(teacher, student):
    return {**IMAGENET_DATA, **COMPRESS_OPTIM, **COMPRESS_2Q, **TEACHERS[teacher], **STUDENTS[student]}


def cc(teacher, student):
    # the cluster classifier sits on the plain backbone: no 8192-d training head (that is CompReSS's ResNet-50)
    return {**IMAGENET_DATA, **CC, **TEACHERS[teacher], **STUDENTS[student], "student.train_head_dim": None}


TRAIN_PRESETS = {
    "mocov2_r50_to_alexnet": compress("mocov2_r50", "alexnet"),
    "mocov2_r50_to_resnet18": compress("mocov2_r50", "resnet18"),
    "mocov2_r50_to_mobilenetv2": compress("mocov2_r50", "mobilenetv2"),
    "swav_r50_to_resnet18": compress("swav_r50", "resnet18"),
    "simclr_r50x4_to_alexnet": compress("simclr_r50x4_cached", "alexnet"),
    "simclr_r50x4_to_resnet50": compress("simclr_r50x4", "resnet50"),
    "cc_mocov2_r50_to_alexnet": cc("mocov2_r50", "alexnet"),
    "cc_mocov2_r50_to_resnet18": cc("mocov2_r50", "resnet18"),
    "cc_mocov2_r50_to_mobilenetv2": cc("mocov2_r50", "mobilenetv2"),
    "cc_simclr_r50x4_to_resnet50": cc("simclr_r50x4", "resnet50"),
}
PRETRAIN_PRESETS = {  # MoCo v2 (the teachers and "MoCo from scratch"): main_moco.py --mlp --moco-t 0.2 --aug-plus --cos
    "mocov2_imagenet": {
        **{k: v for k, v in IMAGENET_DATA.items() if k != "data.crop_scale"}, "data.crop_scale": [0.2, 1.0],
        "data.augment": "mocov2", "student.arch": "resnet50",
        "optim.lr": 0.03, "optim.momentum": 0.9, "optim.weight_decay": 1e-4, "optim.epochs": 200,
        "optim.scheduler": "cosine", "optim.warmup_epochs": 0, "optim.lr_scaling": "none",
        "method.queue_size": 65_536, "method.momentum": 0.999, "method.temperature": 0.2,
        "method.proj_dim": 128, "method.shuffle_bn": True,
    },
}
# MoCo v2's MLP hidden width is the backbone's (2048 for ResNet-50): `null` means exactly that in our config
PRETRAIN_DERIVED = {"mocov2_imagenet": {"method.proj_hidden_dim": (None, 2048)}}


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group / "paper").glob("*.yaml"))


def drift(cfg, expected: dict) -> list[str]:
    out = []
    for key, want in expected.items():
        got = OmegaConf.select(cfg, key, default="<missing>")
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        if isinstance(want, float) and isinstance(got, (int, float)):
            same = abs(got - want) <= 1e-12 * max(1.0, abs(want))
        else:
            same = got == want
        if not same:
            out.append(f"{key}={got!r} (the paper: {want!r})")
    return out


def compose_preset(config_name: str, group: str, name: str):
    required = ["teacher.checkpoint=/ckpt/teacher.pth"] if config_name == "train" else []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=[f"{group}=paper/{name}", "data.root=/data/imagenet", *required])


def test_every_preset_has_a_row():
    assert presets("experiment") == sorted(TRAIN_PRESETS), "a training preset without a row in this table (or gone)"
    assert presets("pretrain_experiment") == sorted(PRETRAIN_PRESETS)


@pytest.mark.parametrize("name", sorted(TRAIN_PRESETS))
def test_training_preset_matches_the_paper(name):
    cfg = compose_preset("train", "experiment", name)
    problems = drift(cfg, TRAIN_PRESETS[name])
    assert not problems, f"experiment=paper/{name}: " + "; ".join(problems)
    validate_train(cfg)
    plan = plan_batch(cfg, 8)  # on 8 GPUs: 32 per GPU, still the paper's global 256 and lr
    assert (plan.global_batch, plan.per_process, plan.lr) == (256, 32, cfg.optim.lr)


@pytest.mark.parametrize("name", sorted(PRETRAIN_PRESETS))
def test_pretraining_preset_matches_the_paper(name):
    cfg = compose_preset("pretrain", "pretrain_experiment", name)
    problems = drift(cfg, PRETRAIN_PRESETS[name])
    for key, (configured, meaning) in PRETRAIN_DERIVED.get(name, {}).items():
        if OmegaConf.select(cfg, key) not in (configured, meaning):
            problems.append(f"{key}={OmegaConf.select(cfg, key)!r} (the paper: {meaning!r})")
    assert not problems, f"pretrain_experiment=paper/{name}: " + "; ".join(problems)
    validate_pretrain(cfg)


def test_drift_is_reported_naming_preset_and_key():
    cfg = compose_preset("train", "experiment", "mocov2_r50_to_alexnet")
    cfg.method.queue_size = 65536
    cfg.data.crop_scale = [0.2, 1.0]
    assert drift(cfg, TRAIN_PRESETS["mocov2_r50_to_alexnet"]) == [
        "data.crop_scale=[0.2, 1.0] (the paper: [0.08, 1.0])", "method.queue_size=65536 (the paper: 128000)"]
