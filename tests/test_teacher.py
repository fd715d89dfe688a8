"""The teacher loader: every checkpoint format round-trips exactly, every mismatch is a named error."""
from __future__ import annotations

import argparse
import re

import pytest
import torch
from torch import nn

from compress_lit.runtime.config import TeacherConfig
from compress_lit.models import build_backbone
from compress_lit.teachers import (FrozenTeacher, TeacherLoadError, build_teacher, load_backbone_state,
                                  simclr_tf_key_map)

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def randomised(arch: str, width_multiplier: float | None = None, seed: int = 1) -> nn.Module:
    """A small-input backbone with random weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    m = build_backbone(arch, small_input=True, width_multiplier=width_multiplier)
    randomise_bn(m)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.num_batches_tracked.fill_(7)
    return m.eval()


def randomise_bn(model: nn.Module) -> None:
    """Random BatchNorm affine parameters and running statistics (a trained network's are not 0/1)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)


def cfg_for(arch, fmt, path, width_multiplier=None) -> TeacherConfig:
    return TeacherConfig(name=f"test-{arch}", arch=arch, format=fmt, checkpoint=str(path), small_input=True,
                         width_multiplier=width_multiplier)


def assert_same_embedding(teacher: FrozenTeacher, source: nn.Module) -> None:
    with torch.no_grad():
        want = source.eval()(X)
    got = teacher(X)
    assert got.shape == (2, source.embed_dim) and teacher.embed_dim == source.embed_dim
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- checkpoint writers in each release's real key layout ---------------------------------------------------
def head(dim: int, v2: bool) -> dict:
    if v2:
        return {"fc.0.weight": torch.randn(dim, dim), "fc.0.bias": torch.randn(dim),
                "fc.2.weight": torch.randn(16, dim), "fc.2.bias": torch.randn(16)}
    return {"fc.weight": torch.randn(16, dim), "fc.bias": torch.randn(16)}


def moco_checkpoint(src: nn.Module, v2: bool = True, prefix: str = "module.") -> dict:
    q = {**src.state_dict(), **head(src.embed_dim, v2)}
    k = {n: t + 1 for n, t in q.items()}  # the key encoder: different values, must be ignored
    sd = {f"{prefix}encoder_q.{n}": t for n, t in q.items()}
    sd.update({f"{prefix}encoder_k.{n}": t for n, t in k.items()})
    sd[f"{prefix}queue"] = torch.randn(16, 64)
    sd[f"{prefix}queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 800, "arch": "resnet50", "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}}


def swav_checkpoint(src: nn.Module) -> dict:
    sd = {f"module.{n}": t for n, t in src.state_dict().items()}
    d = src.embed_dim
    sd.update({"module.projection_head.0.weight": torch.randn(32, d), "module.projection_head.0.bias": torch.randn(32),
               "module.projection_head.1.running_mean": torch.randn(32),
               "module.projection_head.3.weight": torch.randn(8, 32), "module.prototypes.weight": torch.randn(30, 8)})
    return sd


def tf_names_by_creation_order(model: nn.Module) -> dict[str, str]:
    """torchvision module name -> TensorFlow layer name, walking the model's convs/BNs in TF creation order.

    Independent of ``simclr_tf_key_map``: take the model's Conv2d and BatchNorm2d modules as registered, and
    within each block put the projection shortcut first (TensorFlow builds it before the block's convolutions).
    """
    def block_of(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0].startswith("layer") else ""

    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    order = {b: i for i, b in enumerate(dict.fromkeys(block_of(n) for n, _ in mods))}
    mods.sort(key=lambda nm: (order[block_of(nm[0])], 0 if ".downsample." in nm[0] else 1))  # stable sort
    convs = [n for n, m in mods if isinstance(m, nn.Conv2d)]
    bns = [n for n, m in mods if isinstance(m, nn.BatchNorm2d)]
    out = {}
    for i, (c, b) in enumerate(zip(convs, bns, strict=True)):
        out[c] = "conv2d" if i == 0 else f"conv2d_{i}"
        out[b] = "batch_normalization" if i == 0 else f"batch_normalization_{i}"
    return out


def simclr_tf_checkpoint(src: nn.Module, with_nbt: bool = True) -> dict:
    names = tf_names_by_creation_order(src)
    sd = {}
    for key, t in src.state_dict().items():
        module, param = key.rsplit(".", 1)
        if param == "num_batches_tracked" and not with_nbt:
            continue
        sd[f"{names[module]}.{param}"] = t
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, src.embed_dim), torch.randn(1000)
    return {"state_dict": sd}


def lightning_checkpoint(sd: dict, hparams=None) -> dict:
    return {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.6.6", "state_dict": sd,
            "hyper_parameters": hparams or {"config": {"student": {"arch": "resnet18"}}}, "optimizer_states": [],
            "lr_schedulers": []}


# ---- round trips: the loaded teacher computes exactly the source's embedding -----------------------------------
@pytest.mark.parametrize("v2", [False, True])
def test_moco_round_trip(tmp_path, v2):
    src = randomised("resnet18")
    path = tmp_path / "moco.pth.tar"
    torch.save(moco_checkpoint(src, v2=v2), path)
    assert_same_embedding(build_teacher(cfg_for("resnet18", "moco", path)), src)


def test_swav_round_trip(tmp_path):
    src = randomised("resnet50", width_multiplier=0.25)
    path = tmp_path / "swav.pth.tar"
    torch.save(swav_checkpoint(src), path)
    assert_same_embedding(build_teacher(cfg_for("resnet50", "swav", path, 0.25)), src)


@pytest.mark.parametrize("with_nbt", [True, False])
def test_simclr_tf_round_trip(tmp_path, with_nbt):
    # resnet50x4's layout at 1/16 of its width (stem 16 channels): the same 53 convolutions and BNs
    src = randomised("resnet50x4", width_multiplier=0.25)
    path = tmp_path / "ResNet50_4x.pth"
    torch.save(simclr_tf_checkpoint(src, with_nbt=with_nbt), path)
    teacher = build_teacher(cfg_for("resnet50x4", "simclr_tf", path, 0.25))
    assert_same_embedding(teacher, src)
    bn = teacher.backbone.layer1[0].bn1
    assert int(bn.num_batches_tracked) == (7 if with_nbt else 0)  # absent in the file: the model's own is kept


def test_simclr_converted_round_trip(tmp_path):
    src = randomised("resnet50", width_multiplier=0.25)
    sd = dict(src.state_dict())
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, src.embed_dim), torch.randn(1000)
    path = tmp_path / "resnet50-1x.pth"
    torch.save({"state_dict": sd}, path)
    assert_same_embedding(build_teacher(cfg_for("resnet50", "simclr_converted", path, 0.25)), src)


@pytest.mark.parametrize("arch,wm", [("resnet18", None), ("alexnet", 0.25), ("mobilenetv2", 0.25)])
def test_torchvision_round_trip(tmp_path, arch, wm):
    src = randomised(arch, width_multiplier=wm)
    sd = dict(src.state_dict())
    sd["fc.weight"], sd["fc.bias"] = torch.randn(10, src.embed_dim), torch.randn(10)
    path = tmp_path / f"{arch}.pth"
    torch.save(sd, path)
    assert_same_embedding(build_teacher(cfg_for(arch, "torchvision", path, wm)), src)


def test_compress_lit_pretraining_checkpoint(tmp_path):
    src = randomised("resnet18")
    other = randomised("resnet18", seed=2)
    sd = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    sd.update({f"backbone_momentum.{k}": v for k, v in other.state_dict().items()})
    sd.update({"projector.0.weight": torch.randn(8, 512), "projector_momentum.0.weight": torch.randn(8, 512),
               "queue.keys": torch.randn(16, 8), "queue.ptr": torch.zeros((), dtype=torch.long)})
    path = tmp_path / "pretrain.ckpt"
    torch.save(lightning_checkpoint(sd), path)
    assert_same_embedding(build_teacher(cfg_for("resnet18", "compress_lit", path)), src)
    # another Lightning project's file whose hyper-parameters pickle a class: refused (never a full unpickle), the
    # message naming the class and how to keep the tensors alone
    torch.save(lightning_checkpoint(sd, {"args": argparse.Namespace(lr=0.1)}), path)
    msg = load_error(path, "compress_lit")
    assert "refused" in msg and "argparse.Namespace" in msg and "torch.save(obj['state_dict']" in msg


def test_compress_lit_distillation_checkpoint(tmp_path):
    src = randomised("resnet18")
    other = randomised("resnet18", seed=2)
    sd = {f"student.{k}": v for k, v in src.state_dict().items()}
    sd.update({f"student_momentum.{k}": v for k, v in other.state_dict().items()})
    sd.update({f"teacher.backbone.{k}": v for k, v in other.state_dict().items()})
    sd.update({"projection.weight": torch.randn(8, 512), "queues.teacher": torch.randn(16, 8)})
    path = tmp_path / "distill.ckpt"
    torch.save({"epoch": 1, "state_dict": sd}, path)
    assert_same_embedding(build_teacher(cfg_for("resnet18", "compress_lit", path)), src)


def test_random_format_loads_nothing():
    t = build_teacher(TeacherConfig(name="r", arch="resnet18", format="random", small_input=True))
    assert t.embed_dim == 512 and t(X).shape == (2, 512)


# ---- the SimCLR TF table covers the real ResNet-50x4 exactly ----------------------------------------------------
def test_simclr_tf_key_map_covers_real_resnet50x4():
    with torch.device("meta"):  # the real widths (375M parameters) without allocating them
        model = build_backbone("resnet50x4")
    table = simclr_tf_key_map()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(convs) == len(bns) == 53 and len(table) == 106
    assert {v for k, v in table.items() if k.startswith("conv2d")} == set(convs)
    assert {v for k, v in table.items() if k.startswith("batch_normalization")} == set(bns)
    assert table == {**{v: k for k, v in tf_names_by_creation_order(model).items()}}
    # shapes and strides of the CompReSS ResNet50_X4 definition (TF names)
    w = lambda tf: tuple(convs[table[tf]].weight.shape)  # noqa: E731
    assert w("conv2d") == (256, 3, 7, 7)
    assert w("conv2d_1") == (1024, 256, 1, 1) and w("conv2d_2") == (256, 256, 1, 1)
    assert w("conv2d_3") == (256, 256, 3, 3) and w("conv2d_4") == (1024, 256, 1, 1)
    assert w("conv2d_5") == (256, 1024, 1, 1)
    assert w("conv2d_11") == (2048, 1024, 1, 1) and convs[table["conv2d_11"]].stride == (2, 2)
    assert w("conv2d_13") == (512, 512, 3, 3) and convs[table["conv2d_13"]].stride == (2, 2)
    assert convs[table["conv2d_12"]].stride == (1, 1)
    assert w("conv2d_24") == (4096, 2048, 1, 1) and w("conv2d_43") == (8192, 4096, 1, 1)
    assert w("conv2d_52") == (8192, 2048, 1, 1) and model.embed_dim == 8192
    assert tuple(bns[table["batch_normalization_52"]].weight.shape) == (8192,)
    assert table["conv2d_52"] == "layer4.2.conv3" and table["batch_normalization_1"] == "layer1.0.downsample.1"


# ---- errors name the file, the format and the keys ------------------------------------------------------------
def load_error(path, fmt, arch="resnet18", wm=None) -> str:
    model = build_backbone(arch, small_input=True, width_multiplier=wm)
    with pytest.raises(TeacherLoadError) as ei:
        load_backbone_state(str(path), fmt, model)
    msg = str(ei.value)
    assert str(path) in msg and fmt in msg
    return msg


def test_moco_without_module_prefix_fails(tmp_path):
    path = tmp_path / "moco_noprefix.pth.tar"
    torch.save(moco_checkpoint(randomised("resnet18"), prefix=""), path)
    msg = load_error(path, "moco")
    assert "module.encoder_q." in msg and "encoder_q.conv1.weight" in msg


def test_moco_without_state_dict_fails(tmp_path):
    path = tmp_path / "moco_flat.pth.tar"
    torch.save(moco_checkpoint(randomised("resnet18"))["state_dict"], path)
    msg = load_error(path, "moco")
    assert "'state_dict'" in msg and "module.encoder_q.conv1.weight" in msg


def test_torchvision_file_as_swav_fails_and_guesses(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(randomised("resnet18").state_dict(), path)
    msg = load_error(path, "swav")
    assert "conv1.weight" in msg and "'torchvision'" in msg


def test_swav_file_as_torchvision_fails(tmp_path):
    """The DDP prefix is stripped, but SwAV's projection head and prototypes are not a torchvision classifier's."""
    path = tmp_path / "swav.pth.tar"
    torch.save(swav_checkpoint(randomised("resnet18")), path)
    msg = load_error(path, "torchvision")
    assert "unexpected 5 keys: module.projection_head.0.weight (as projection_head.0.weight)" in msg
    assert "'module.' prefix of every key" in msg and "fits format 'swav'" in msg


def test_a_dict_holding_a_torchvision_state_dict_loads_as_torchvision_and_as_simclr_converted(tmp_path):
    src = randomised("resnet18")
    path = tmp_path / "resnet50-1x.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    for fmt in ("torchvision", "simclr_converted"):
        assert_same_embedding(build_teacher(cfg_for("resnet18", fmt, path)), src)


def torchvision_classifier(seed: int = 0) -> nn.Module:
    """torchvision's resnet18 (fc included) with random weights and BatchNorm statistics, in eval mode."""
    import torchvision

    torch.manual_seed(seed)
    tv = torchvision.models.resnet18(weights=None)
    randomise_bn(tv)
    return tv.eval()


def examples_imagenet_checkpoint(wrapped: nn.Module) -> dict:
    """What pytorch/examples' imagenet/main.py saves (save_checkpoint): the wrapped model's state_dict beside the
    epoch, the arch name, the best top-1 (a tensor) and the optimiser's state."""
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return {"epoch": 90, "arch": "resnet18", "state_dict": wrapped.state_dict(), "best_acc1": torch.tensor(69.76),
            "optimizer": opt.state_dict()}


@pytest.mark.parametrize("wrapper", [False, True])
def test_a_dataparallel_resnet_loads_as_torchvision_with_the_prefix_stripped_once(tmp_path, caplog, wrapper):
    """A torchvision classifier trained under nn.DataParallel (DistributedDataParallel names its keys the same:
    ``module.<key>``), fc included, saved bare or as pytorch/examples' ImageNet script saves it."""
    import logging

    tv = torchvision_classifier()
    dp = nn.DataParallel(tv)  # on CPU it only wraps: its state_dict is the real layout
    sd = dp.state_dict()
    assert all(k.startswith("module.") for k in sd) and "module.fc.weight" in sd and "module.conv1.weight" in sd
    path = tmp_path / ("model_best.pth.tar" if wrapper else "dp_resnet18.pth")
    torch.save(examples_imagenet_checkpoint(dp) if wrapper else sd, path)
    with caplog.at_level(logging.INFO, logger="compress_lit.teachers.loading"):
        t = build_teacher(TeacherConfig(name="r18", arch="resnet18", format="torchvision", checkpoint=str(path)))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        want = torch.flatten(tv.avgpool(tv.layer4(tv.layer3(tv.layer2(tv.layer1(h))))), 1)  # fc's input
    torch.testing.assert_close(t(x), want, rtol=0, atol=0)
    line = next(r.getMessage() for r in caplog.records if "loaded" in r.getMessage())
    assert "the 'module.' prefix of every key (a model saved under nn.DataParallel / DistributedDataParallel) " \
           "stripped once" in line
    assert ("'state_dict' entry taken from a training checkpoint (keys state_dict, epoch, arch, best_acc1, "
            "optimizer)" in line) == wrapper


def test_the_ddp_prefix_is_stripped_once_and_only_where_the_layout_has_no_prefix(tmp_path):
    src = randomised("resnet18")
    twice = tmp_path / "twice.pth"
    torch.save({f"module.module.{k}": v for k, v in src.state_dict().items()}, twice)
    msg = load_error(twice, "torchvision")
    assert "module.module.conv1.weight (as module.conv1.weight)" in msg  # stripped once, not twice
    once = tmp_path / "once.pth"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, once)
    for fmt in ("torchvision", "swav"):  # SwAV's own layout is exactly module.<torchvision key>
        assert_same_embedding(build_teacher(cfg_for("resnet18", fmt, once)), src)
    msg = load_error(once, "moco")  # MoCo's own layout is {'state_dict': {module.encoder_q.*}}: no stripping there
    assert "expected a MoCo release checkpoint" in msg and "fits format 'swav' / 'torchvision' instead" in msg


def test_missing_layer_names_key_and_count(tmp_path):
    sd = dict(randomised("resnet18").state_dict())
    for k in ("layer1.0.conv1.weight", "layer2.1.bn2.running_var", "layer4.0.downsample.0.weight"):
        del sd[k]
    del sd["layer3.0.bn1.num_batches_tracked"]  # tolerated, not listed
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    msg = load_error(path, "torchvision")
    assert "missing 3 keys" in msg and "(3 in all)" in msg
    assert "layer1.0.conv1.weight" in msg and "layer4.0.downsample.0.weight" in msg
    assert "num_batches_tracked" not in msg


def test_extra_key_is_named(tmp_path):
    sd = dict(randomised("resnet18").state_dict())
    sd["layer5.0.conv1.weight"] = torch.randn(3, 3)
    path = tmp_path / "extra.pth"
    torch.save(sd, path)
    msg = load_error(path, "torchvision")
    assert "unexpected 1 key" in msg and "layer5.0.conv1.weight" in msg


def test_extra_key_in_moco_file_is_named(tmp_path):
    ckpt = moco_checkpoint(randomised("resnet18"))
    ckpt["state_dict"]["module.encoder_q.extra.weight"] = torch.randn(2)
    ckpt["state_dict"]["module.something_else"] = torch.randn(2)
    path = tmp_path / "moco_extra.pth.tar"
    torch.save(ckpt, path)
    msg = load_error(path, "moco")
    assert "module.encoder_q.extra.weight" in msg and "module.something_else" in msg and "unexpected 2 keys" in msg


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(randomised("resnet18").state_dict(), path)
    msg = load_error(path, "torchvision", arch="resnet50")
    assert "layer1.0.conv1.weight: file (64, 64, 3, 3) vs model (64, 64, 1, 1)" in msg


def test_simclr_tf_wrong_width_names_shapes(tmp_path):
    path = tmp_path / "ResNet50_x.pth"
    torch.save(simclr_tf_checkpoint(randomised("resnet50x4", width_multiplier=0.25)), path)
    msg = load_error(path, "simclr_tf", arch="resnet50x4", wm=0.5)
    assert re.search(r"conv1\.weight: file \(16, 3, 3, 3\) vs model \(32, 3, 3, 3\) \(file key conv2d\.weight\)", msg)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    assert "no such file" in load_error(path, "moco")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.pth.tar"
    torch.save(moco_checkpoint(randomised("resnet18")), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "not a readable checkpoint" in load_error(path, "moco")
    assert "not a readable checkpoint" in load_error(path, "compress_lit")


def test_text_file(tmp_path):
    path = tmp_path / "README.txt"
    path.write_text("this is not a checkpoint\n")
    assert "not a readable checkpoint" in load_error(path, "torchvision")
    assert "not a readable checkpoint" in load_error(path, "compress_lit")


def test_build_teacher_without_checkpoint_path_fails():
    with pytest.raises(TeacherLoadError, match="checkpoint"):
        build_teacher(TeacherConfig(name="t", arch="resnet18", format="moco", checkpoint=None, small_input=True))


# ---- frozen: eval mode whatever Lightning does, no grads ----------------------------------------------------------
def test_teacher_stays_frozen(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(randomised("resnet18").state_dict(), path)
    t = build_teacher(cfg_for("resnet18", "torchvision", path))
    wrapper = nn.ModuleDict({"teacher": t, "student": nn.Linear(2, 2)})
    wrapper.train()  # what Lightning does to the LightningModule every epoch
    assert wrapper["student"].training
    assert not any(m.training for m in t.modules())
    assert not any(p.requires_grad for p in t.parameters())
    t.assert_frozen()
    before = t.backbone.bn1.running_mean.clone()
    out = t(X)
    assert not out.requires_grad
    torch.testing.assert_close(t.backbone.bn1.running_mean, before, rtol=0, atol=0)  # BN stats untouched

    t.backbone.layer2[0].bn1.train()  # someone forces a submodule into train mode
    with pytest.raises(AssertionError, match="layer2.0.bn1"):
        t.assert_frozen()
    t.train()
    t.assert_frozen()
    t.backbone.conv1.weight.requires_grad_(True)
    with pytest.raises(AssertionError, match="conv1.weight"):
        t.assert_frozen()


def test_fingerprint_tracks_weights(tmp_path):
    a = FrozenTeacher(randomised("resnet18", seed=1))
    b = FrozenTeacher(randomised("resnet18", seed=1))
    c = FrozenTeacher(randomised("resnet18", seed=2))
    assert isinstance(a.fingerprint(), str) and 8 <= len(a.fingerprint()) <= 40
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    with torch.no_grad():
        b.backbone.layer4[1].bn2.running_var[0] += 1  # one buffer element changed
    assert a.fingerprint() != b.fingerprint()
