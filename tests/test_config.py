"""Config composition and start-up validation: bad values fail naming the key, before any work starts."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from compress_lit.runtime.config import METHODS, ConfigError, register_configs, validate_pretrain, validate_train

CONF = str(Path(__file__).resolve().parents[1] / "conf")
register_configs()


def train_cfg(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_embedded_default_composes_and_validates():
    cfg = train_cfg()
    validate_train(cfg)
    assert cfg.data.name == "digits" and cfg.teacher.name == "demo" and cfg.method.name == "compress_2q"
    assert cfg.method.queue_size == 1024  # the digits preset's queue, smaller than its 1,437 images


def test_paper_setting_composes_with_paper_hyperparameters():
    cfg = train_cfg("teacher=resnet50x4", "student=alexnet", "data=imagenet", "data.root=/data/imagenet",
                    "teacher.checkpoint=/ckpt/r50x4.pth")
    validate_train(cfg)
    assert (cfg.teacher.arch, cfg.teacher.format, cfg.student.arch) == ("resnet50x4", "simclr_tf", "alexnet")
    m, o, d = cfg.method, cfg.optim, cfg.data
    assert (m.queue_size, m.temperature, m.momentum, m.use_momentum_encoder) == (128_000, 0.04, 0.999, True)
    assert (o.lr, o.momentum, o.weight_decay, o.epochs, list(o.milestones), o.gamma) == (0.01, 0.9, 1e-4, 130, [90, 120], 0.2)
    assert (d.batch_size, d.image_size, d.resize_size, d.hflip) == (256, 224, 256, True)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_validates(method):
    cfg = train_cfg(f"method={method}")
    validate_train(cfg)
    assert cfg.method.name == method


def test_every_method_has_a_config_and_every_config_is_a_method():
    assert sorted(p.stem for p in (Path(CONF) / "method").glob("*.yaml")) == sorted(METHODS)


@pytest.mark.parametrize("override,key", [
    ("method.queue_size=0", "method.queue_size"),
    ("method.queue_size=-5", "method.queue_size"),
    ("method.temperature=0", "method.temperature"),
    ("method.temperature=-0.1", "method.temperature"),
    ("method.momentum=1.0", "method.momentum"),
    ("optim.lr=0", "optim.lr"),
    ("optim.epochs=0", "optim.epochs"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.crop_scale=[0.9,0.1]", "data.crop_scale"),
    ("optim.scheduler=linear", "optim.scheduler"),
    ("student.arch=vgg16", "student.arch"),
    ("teacher.format=tf_hub", "teacher.format"),
    ("logger.mode=sometimes", "logger.mode"),
    ("optim.milestones=[120,90]", "optim.milestones"),
    ("method.one_queue=true", "method.one_queue"),
    ("data.loader=gpu", "data.loader"),
])
def test_bad_values_fail_naming_the_key(override, key):
    cfg = train_cfg(override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_train(cfg)


def test_missing_teacher_checkpoint_is_named():
    cfg = train_cfg("teacher=mocov2_resnet50", "teacher.checkpoint=null")
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        validate_train(cfg)


def test_wrong_type_fails_at_composition_naming_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        train_cfg("method.queue_size=lots")
    assert "queue_size" in str(e.value.__cause__) or "queue_size" in str(e.value)


def test_typo_in_a_key_fails_struct_mode():
    with pytest.raises(ConfigCompositionException) as e:
        train_cfg("method.temprature=0.1")
    assert "temprature" in str(e.value)


def test_unknown_group_option_fails():
    with pytest.raises(MissingConfigException) as e:
        train_cfg("student=vgg")
    assert "vgg" in str(e.value)


def test_struct_mode_is_on_at_run_time():
    cfg = train_cfg()
    with pytest.raises((ConfigAttributeError, ConfigKeyError)):
        cfg.method.temprature = 1.0
    with pytest.raises(ValidationError):
        cfg.method.queue_size = "big"


def test_pretrain_config_composes():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=["pretrain_experiment=demo_teacher"])
    validate_pretrain(cfg)
    assert cfg.student.arch == "resnet18" and cfg.student.width_multiplier == 0.5 and cfg.method.queue_size == 256
    assert cfg.method.temperature == 0.2


def _options(group):
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in ("teacher", "student", "data", "method", "optim", "trainer",
                                                           "logger") for o in _options(g)])
def test_every_group_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if group == "teacher" and option not in ("demo", "fashion_mnist"):
        overrides.append("teacher.checkpoint=/ckpt/teacher.pth")
    if group == "teacher" and option.startswith("dinov2"):  # 14-px patches: digits' 16 px is not a multiple
        overrides.append("data.image_size=28")
    if group == "teacher" and option == "timm":  # a timm model by name (its weights: the HF cache or a file)
        overrides.append("teacher.name=resnet18.a1_in1k")
    if group == "data" and option in ("imagenet", "places205"):  # user-provided ImageFolder trees
        overrides.append(f"data.root=/data/{option}")
    validate_train(train_cfg(*overrides))


@pytest.mark.parametrize("experiment", _options("pretrain_experiment"))
def test_every_pretrain_experiment_composes(experiment):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        validate_pretrain(compose(config_name="pretrain", overrides=[f"pretrain_experiment={experiment}"]))


def test_slurm_launcher_composes_with_ddp():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "hydra.launcher.nodes=2",
                                 "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (2, 8, 8, "gpu")
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes == 2


@pytest.mark.parametrize("overrides,message", [
    # the case: DINOv2's 14-px patches on the digits' 16 px (it used to fail at the first step)
    (["teacher=dinov2_vits14", "teacher.checkpoint=/t.pth"],
     "data.image_size=16 is not a multiple of the patch size of teacher.arch=vit_small_patch14_dinov2 (patch 14 px): "
     "the ViT cuts the image into 14 x 14 patches; use data.image_size=14 or 28, or another teacher"),
    (["student=vit_tiny", "data=fashion_mnist"],
     "data.image_size=28 is not a multiple of the patch size of student.arch=vit_tiny_patch16 (patch 16 px): "
     "the ViT cuts the image into 16 x 16 patches; use data.image_size=16 or 32, or another student"),
    (["student=vit_tiny_small", "student.vit.patch_size=6", "student.vit.img_size=36"],
     "data.image_size=16 is not a multiple of the patch size of student.arch=vit_tiny_patch16 (patch 6 px, "
     "student.vit.patch_size): the ViT cuts the image into 6 x 6 patches; use data.image_size=12 or 18"),
])
def test_a_vit_patch_size_that_does_not_divide_the_image_size_fails_at_start_up(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate_train(train_cfg(*overrides))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_fewer_than_4x4_patches_is_a_warning(caplog):
    import logging

    ok = train_cfg("teacher=dinov2_vits14", "teacher.checkpoint=/t.pth", "data.image_size=28")  # 2 x 2 patches
    with caplog.at_level(logging.WARNING, logger="compress_lit.config"):
        validate_train(ok)
    (msg,) = [r.getMessage() for r in caplog.records if "patches" in r.getMessage()]
    assert "teacher.arch=vit_small_patch14_dinov2 (patch 14 px) only 2 x 2 patches (fewer than 4 x 4)" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compress_lit.config"):
        validate_train(train_cfg("student=vit_tiny_small"))  # 4-px patches on 16 px: 4 x 4, no warning
    assert not [r for r in caplog.records if "patches" in r.getMessage()]
