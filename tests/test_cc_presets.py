"""The CC baseline's paper presets (experiment=paper/cc_*) and the optimiser options they need: Nesterov momentum
and no weight decay on BatchNorm (as the official train_kmeans.py: BatchNorm weights and biases at wd 0, every
other parameter, conv/linear biases included, at 1e-4)."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from compress_lit.runtime.config import ConfigError, OptimConfig, register_configs, validate_train
from compress_lit.methods.baselines import ClusterClassification
from compress_lit.models import build_backbone
from compress_lit.methods.schedule import build_optimizer
from compress_lit.teachers import FrozenTeacher

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()
# docs/paper.md table, CC row (Linear / 1-NN / cluster alignment), and the preset's teacher and student
CC_PRESETS = {
    "cc_mocov2_r50_to_alexnet": ("resnet50", "alexnet", "46.4 / 31.6 / 13.7"),
    "cc_mocov2_r50_to_resnet18": ("resnet50", "resnet18", "61.1 / 51.1 / 25.2"),
    "cc_mocov2_r50_to_mobilenetv2": ("resnet50", "mobilenetv2", "59.2 / 50.2 / 24.7"),
    "cc_simclr_r50x4_to_resnet50": ("resnet50x4", "resnet50", "68.9 / 55.6 / 26.4"),
}


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_every_cc_preset_is_listed():
    assert {p.stem for p in (CONF / "experiment" / "paper").glob("cc_*.yaml")} == set(CC_PRESETS)


@pytest.mark.parametrize("preset", sorted(CC_PRESETS))
def test_cc_preset_has_the_papers_settings(preset):
    cfg = _cfg(f"experiment=paper/{preset}", "teacher.checkpoint=/ckpt/t.pth", "data.root=/data/imagenet")
    validate_train(cfg)
    teacher_arch, student_arch, numbers = CC_PRESETS[preset]
    assert (cfg.teacher.arch, cfg.student.arch) == (teacher_arch, student_arch)
    assert (cfg.method.name, cfg.method.cc_clusters, cfg.method.cc_kmeans_iters) == ("cc", 16000, 20)
    o = cfg.optim
    assert (o.lr, o.scheduler, o.epochs, o.momentum, o.weight_decay, o.warmup_epochs) == (0.1, "cosine", 100, 0.9,
                                                                                          1e-4, 0)
    assert o.nesterov is True and o.bn_weight_decay is False
    d = cfg.data
    assert (d.name, d.batch_size, d.image_size, list(d.crop_scale), d.hflip, d.augment) == \
        ("imagefolder", 256, 224, [0.08, 1.0], True, "crop_flip")
    assert cfg.student.train_head_dim is None  # the classifier sits on the backbone's embedding
    assert numbers in (CONF / "experiment" / "paper" / f"{preset}.yaml").read_text()


def _tiny_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def _optim(**kw):
    return OmegaConf.structured(OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.01, epochs=10, scheduler="constant",
                                            milestones=[], **kw))


def test_bn_parameters_get_no_weight_decay_and_nesterov_is_on():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    opt = build_optimizer([{"name": "student", "params": list(net.parameters())}],
                          _optim(nesterov=True, bn_weight_decay=False), model=net)["optimizer"]
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"student", "student_bn"}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["student_bn"]["params"]) == ids([net[1].weight, net[1].bias, net[4].weight, net[4].bias])
    assert ids(groups["student"]["params"]) == ids([net[0].weight, net[0].bias, net[3].weight, net[3].bias])
    assert groups["student_bn"]["weight_decay"] == 0.0 and groups["student"]["weight_decay"] == 0.01
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)


def test_one_nesterov_step_by_hand():
    """SGD step 1 with Nesterov: buf = g + wd p, update = lr (g + wd p) (1 + m); BatchNorm: wd 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = build_optimizer(net.parameters(), _optim(nesterov=True, bn_weight_decay=False), model=net)["optimizer"]
    net(torch.randn(2, 3, 6, 6)).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    for n, p in net.named_parameters():
        wd = 0.0 if n.startswith("1.") else 0.01
        expected = before[n] - 0.1 * (grads[n] + wd * before[n]) * 1.9
        torch.testing.assert_close(p.detach(), expected, msg=n)


def test_defaults_keep_plain_sgd_with_bn_decayed():
    net = _tiny_net()
    net(torch.randn(1, 3, 5, 5))
    opt = build_optimizer(net.parameters(), _optim())["optimizer"]
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.01
    assert not opt.param_groups[0]["nesterov"]
    # a plain namespace without the new keys (the linear probe's) is the same plain SGD
    ns = SimpleNamespace(lr=0.1, momentum=0.9, weight_decay=0.0, epochs=1, scheduler="constant", milestones=[],
                         gamma=0.1, warmup_epochs=0)
    assert not build_optimizer(net.parameters(), ns)["optimizer"].param_groups[0]["nesterov"]
    with pytest.raises(ValueError, match="bn_weight_decay"):
        build_optimizer(net.parameters(), _optim(bn_weight_decay=False))


def test_cc_training_module_honours_the_preset_optimiser():
    """`compress_lit.train ... method=cc`: the student's BatchNorm at wd 0, its convolutions and the cluster
    classifier at 1e-4, Nesterov on."""
    cfg = _cfg("experiment=paper/cc_mocov2_r50_to_resnet18", "teacher.checkpoint=/ckpt/t.pth", "data.root=/d")
    student = build_backbone("resnet18", small_input=True, width_multiplier=0.25)
    teacher = FrozenTeacher(build_backbone("resnet18", small_input=True, width_multiplier=0.25))
    module = ClusterClassification(student, teacher, cfg.optim, num_samples=40, num_clusters=8)
    opt = module.configure_optimizers()["optimizer"]
    groups = {g["name"]: g for g in opt.param_groups}
    bn = {id(p) for m in student.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in groups["student_bn"]["params"]} == bn
    plain = {id(p) for p in groups["student"]["params"]}
    assert id(module.classifier.weight) in plain and id(module.classifier.bias) in plain and not plain & bn
    assert len(plain) + len(bn) == len([p for p in module.parameters() if p.requires_grad])
    assert groups["student_bn"]["weight_decay"] == 0.0 and groups["student"]["weight_decay"] == 1e-4
    assert all(g["nesterov"] for g in opt.param_groups) and opt.param_groups[0]["lr"] == 0.1


def test_nesterov_needs_momentum():
    with pytest.raises(ConfigError, match="optim.nesterov"):
        validate_train(_cfg("optim.nesterov=true", "optim.momentum=0"))
