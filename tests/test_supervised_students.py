"""The paper's supervised rows: torchvision's ImageNet classifiers loaded as our backbones (format torchvision).

Every torchvision model here has random weights (``weights=None``, nothing is downloaded); its state_dict is
saved as torchvision's files are, loaded through the evaluation's loader, and our embedding must equal the
penultimate feature torchvision's own model computes (AlexNet ReLU(fc7), ResNet / MobileNetV2 pool).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from compress_lit.evaluation.loading import load_model
from compress_lit.models import build_backbone
from compress_lit.models.torchvision_keys import alexnet_key_map, torchvision_key
from compress_lit.teachers import TeacherLoadError

ROOT = Path(__file__).resolve().parents[1]


def _torchvision_penultimate(arch: str, seed: int = 0) -> tuple[nn.Module, callable]:
    """A randomly initialised torchvision classifier and a function returning its penultimate feature."""
    torch.manual_seed(seed)
    if arch == "alexnet":
        tv = torchvision.models.alexnet(weights=None).eval()
        # features -> avgpool -> flatten -> classifier[:6] (Dropout, fc6, ReLU, Dropout, fc7, ReLU): ReLU(fc7)
        return tv, lambda x: tv.classifier[:6](torch.flatten(tv.avgpool(tv.features(x)), 1))
    if arch == "mobilenetv2":
        tv = torchvision.models.mobilenet_v2(weights=None).eval()
        return tv, lambda x: torch.flatten(nn.functional.adaptive_avg_pool2d(tv.features(x), 1), 1)
    tv = getattr(torchvision.models, arch)(weights=None).eval()

    def pool(x):
        x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        x = tv.layer4(tv.layer3(tv.layer2(tv.layer1(x))))
        return torch.flatten(tv.avgpool(x), 1)

    return tv, pool


def _randomise_bn_stats(model: nn.Module) -> None:
    """Non-trivial running statistics, so that loading them (or not) shows in the output."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))


@pytest.mark.parametrize("arch", ["alexnet", "resnet18", "mobilenetv2", "resnet50"])
def test_torchvision_classifier_gives_torchvision_embedding(tmp_path, arch):
    tv, penultimate = _torchvision_penultimate(arch)
    _randomise_bn_stats(tv)
    path = tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), path)  # torchvision's files are exactly this: the classifier's plain state_dict
    loaded = load_model(str(path), "torchvision", {"arch": arch})
    assert loaded.arch == arch and loaded.layer_name(None) == ("fc7" if arch == "alexnet" else "pool")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = penultimate(x)
        got = loaded.model(x)
    assert got.shape == want.shape == (2, {"alexnet": 4096, "resnet18": 512, "mobilenetv2": 1280,
                                           "resnet50": 2048}[arch])
    assert want.abs().max() > 0  # a non-degenerate feature
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_alexnet_pool5_equals_torchvision_pooling_at_224():
    # conv5 of a 224 px input is 13 x 13: MaxPool2d(3, 2) gives 6 x 6 (windows at 0, 2, ..., 10), which
    # AdaptiveAvgPool2d(6) leaves unchanged; AdaptiveMaxPool2d(6) takes the max over windows
    # [floor(13 i / 6), ceil(13 (i + 1) / 6)) = [0,3), [2,5), [4,7), [6,9), [8,11), [10,13): the same windows
    ours = build_backbone("alexnet")
    assert isinstance(ours.pool5, nn.AdaptiveMaxPool2d) and ours.pool5.output_size == 6
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    conv5 = ours.forward_features(x, ("conv5",))["conv5"]
    assert conv5.shape[-2:] == (13, 13)
    tv_pool = nn.Sequential(nn.MaxPool2d(3, 2), nn.AdaptiveAvgPool2d(6))
    torch.testing.assert_close(ours.pool5(conv5), tv_pool(conv5), rtol=0, atol=0)
    # by hand, one output cell: row 2, column 5 is the max over conv5 rows 4..6, columns 10..12
    torch.testing.assert_close(ours.pool5(conv5)[:, :, 2, 5], conv5[:, :, 4:7, 10:13].amax((-2, -1)))


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_alexnet_key_map_finds_the_layers_whatever_the_dropout(dropout):
    model = build_backbone("alexnet", small_input=True, width_multiplier=0.25, dropout=dropout)
    table = alexnet_key_map(model)
    own = model.state_dict()
    assert set(table) == {"features.0", "features.3", "features.6", "features.8", "features.10", "classifier.1",
                          "classifier.4"}
    for tv_prefix, ours in table.items():
        assert f"{ours}.weight" in own and f"{ours}.bias" in own
    assert table["features.0"].startswith("conv1.") and table["classifier.4"].startswith("fc7.")
    assert torchvision_key("classifier.6.weight", model) is None  # the 1000-way head
    assert torchvision_key("fc7.1.weight", model) == "fc7.1.weight"  # our own layout maps to itself
    assert torchvision_key("classifier.1.weight", build_backbone("mobilenetv2", width_multiplier=0.25)) is None


def test_wrong_classifier_file_names_file_format_and_keys(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(TeacherLoadError) as err:
        load_model(str(path), "torchvision", {"arch": "mobilenetv2"})
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "'torchvision'" in msg
    assert "missing" in msg and "features.0.0.weight" in msg and "unexpected" in msg and "conv1.weight" in msg

    # an AlexNet file without fc7's weight: the missing key is named on our backbone
    sd = torchvision.models.alexnet(weights=None).state_dict()
    del sd["classifier.4.weight"]
    bad = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(sd, bad)
    with pytest.raises(TeacherLoadError, match=r"missing 1 key: fc7\.\d\.weight"):
        load_model(str(bad), "torchvision", {"arch": "alexnet"})


def test_evaluate_cli_wrong_file_is_one_line(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None, width_mult=0.25).state_dict(), path)
    proc = subprocess.run([sys.executable, "-m", "compress_lit.evaluate", f"checkpoint={path}",
                           "model_format=torchvision", "model.arch=resnet18", "data=digits",
                           f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("compress_lit.evaluate: TeacherLoadError: ") and str(path) in lines[-1]
    assert "Traceback" not in proc.stderr and "missing" in lines[-1] and "'torchvision'" in lines[-1]
