"""MoCo v2 at scale: the ImageNet pretraining preset (pretrain_experiment=paper/mocov2_imagenet) has MoCo v2's
hyperparameters and builds MoCo v2's model; the pretraining method's config checks."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from compress_lit.runtime.config import ConfigError, register_configs, validate_pretrain
from compress_lit.data.transforms import train_transform
from compress_lit.methods import MoCoV2
from compress_lit.methods.build import build_student

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="pretrain", overrides=list(overrides))


def _preset(*extra):
    return _cfg("pretrain_experiment=paper/mocov2_imagenet", "data.root=/data/imagenet", *extra)


def test_mocov2_imagenet_preset_has_mocov2s_hyperparameters():
    cfg = _preset("student=resnet50")
    validate_pretrain(cfg)
    m, o, d = cfg.method, cfg.optim, cfg.data
    assert (m.queue_size, m.momentum, m.temperature, m.proj_dim, m.proj_hidden_dim) == (65536, 0.999, 0.2, 128, None)
    assert m.shuffle_bn is True and m.bn_splits is None  # auto: 8 groups of 32 on one device, MoCo's shuffle on DDP
    assert (o.lr, o.scheduler, o.epochs, o.momentum, o.weight_decay, o.warmup_epochs) == (0.03, "cosine", 200, 0.9,
                                                                                          1e-4, 0)
    assert o.nesterov is False and o.bn_weight_decay is True
    assert (d.name, d.batch_size, d.image_size, list(d.crop_scale), d.hflip, d.augment, d.color_jitter) == \
        ("imagefolder", 256, 224, [0.2, 1.0], True, "mocov2", 0.0)
    assert (cfg.student.arch, cfg.student.small_input) == ("resnet50", False)


@pytest.mark.parametrize("student,width", [("resnet50", 2048), ("resnet18", 512)])
def test_mocov2_imagenet_preset_builds_mocov2s_model(student, width):
    """MLP head hidden = the backbone's width (MoCo's rule: 2048 for ResNet-50), out 128; a queue of 65,536 keys."""
    cfg = _preset(f"student={student}")
    m = cfg.method
    module = MoCoV2(build_student(cfg.student), cfg.optim, queue_size=m.queue_size, temperature=m.temperature,
                    momentum=m.momentum, proj_hidden_dim=m.proj_hidden_dim, proj_dim=m.proj_dim,
                    shuffle_bn=m.shuffle_bn, bn_splits=m.bn_splits)
    p = module.projector
    assert (p[0].in_features, p[0].out_features, p[2].in_features, p[2].out_features) == (width, width, width, 128)
    assert tuple(module.queue.bank("keys").shape) == (65536, 128)
    assert module.bn_groups(256) == 8 and module.bn_groups(32) == 2
    torch.testing.assert_close(module.queue.bank("keys")[:4].norm(dim=1), torch.ones(4))


def test_mocov2_imagenet_preset_uses_mocov2_augmentation():
    import torchvision.transforms as T

    steps = train_transform(_preset().data).transforms
    assert [type(s) for s in steps] == [T.RandomResizedCrop, T.RandomApply, T.RandomGrayscale, T.RandomApply,
                                        T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert steps[0].scale == (0.2, 1.0)


def test_small_presets_keep_working_with_the_new_defaults():
    cfg = _cfg("pretrain_experiment=demo_teacher")
    validate_pretrain(cfg)
    assert cfg.method.bn_splits is None and cfg.method.shuffle_bn and cfg.data.augment == "crop_flip"
    assert cfg.method.proj_hidden_dim == 512


@pytest.mark.parametrize("override,key", [
    ("method.bn_splits=40", "method.bn_splits"),  # 40 groups of a batch of 64: under 2 samples each
    ("method.bn_splits=0", "method.bn_splits"),
    ("method.proj_hidden_dim=0", "method.proj_hidden_dim"),
    ("data.augment=simclr", "data.augment"),
    ("data.augment=mocov2", "data.color_jitter"),  # fashion_mnist's brightness/contrast jitter would do nothing
])
def test_bad_pretrain_values_name_their_key(override, key):
    cfg = _cfg("pretrain_experiment=fashion_mnist_teacher", "data.batch_size=64", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_pretrain(cfg)


def test_bn_splits_that_fit_are_accepted():
    validate_pretrain(_cfg("pretrain_experiment=demo_teacher", "method.bn_splits=32"))  # 32 groups of 2
    validate_pretrain(_cfg("pretrain_experiment=demo_teacher", "method.bn_splits=3"))  # uneven groups: fine
    with pytest.raises((ValidationError, ConfigCompositionException)):
        _cfg("method.shuffle_bn=maybe")
