"""The per-layer linear table (`compress_lit.linear layers=[...]` / `layer=all`) on an ImageFolder tree
(`data=places205 data.root=...`): one pass, one head per layer, the same numbers as single-layer runs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from compress_lit.runtime.config import ConfigError
from compress_lit.evaluation.features import pooled_grid, vectorize
from compress_lit.models import build_backbone

CONF = str(Path(__file__).resolve().parents[1] / "conf")
COLOURS = [(140, 110, 110), (110, 140, 110), (110, 110, 140)]  # close: not all separable


def make_image_folder(root: Path, n_train: int = 6, n_val: int = 3, size: int = 20) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png``: three classes of noisy colour patches."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, colour in enumerate(COLOURS):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = np.clip(np.array(colour) + rng.integers(-60, 60, (size, size + 2 * (i % 2), 3)), 0, 255)
                Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.png")
    return root


def save_student(path: Path, arch: str = "alexnet", **kw) -> torch.nn.Module:
    """A random-weight student in this project's checkpoint format (trained on digits, per its config)."""
    torch.manual_seed(0)
    student = {"name": f"tiny_{arch}", "arch": arch, "small_input": True, "width_multiplier": 0.125,
               "fc_dim": kw.get("fc_dim")}
    model = build_backbone(arch, small_input=True, width_multiplier=0.125, **kw)
    data = {"name": "digits", "image_size": 16, "batch_size": 64, "num_workers": 0}
    torch.save({"state_dict": {"student." + k: v for k, v in model.state_dict().items()},
                "hyper_parameters": {"config": {"student": student, "data": data}}}, path)
    return model.eval()


def tree_overrides(tmp_path, ckpt, tree):
    return [f"checkpoint={ckpt}", "data=places205", f"data.root={tree}", "data.image_size=16",
            "data.resize_size=18", "data.num_workers=0", "data.eval_batch_size=20", "progress=false",
            f"cache_dir={tmp_path / 'cache'}", "linear.batch_size=6", "linear.lr=0.1", "trainer.accelerator=cpu"]


def _compose(name, overrides):
    from compress_lit.evaluation.settings import register_eval_configs

    register_eval_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture
def tree_and_student(tmp_path):
    tree = make_image_folder(tmp_path / "places")
    ckpt = tmp_path / "alexnet.ckpt"
    model = save_student(ckpt, "alexnet", fc_dim=32)
    return tree, ckpt, model


def test_pooled_grid_follows_the_9k_convention():
    # AlexNet at 224 px: conv1 64 x 55 x 55, conv2 192 x 27 x 27, conv3 384 x 13 x 13, conv4/5 256 x 13 x 13
    assert [pooled_grid(c, h, h, 9216) for c, h in ((64, 55), (192, 27), (384, 13), (256, 13), (256, 13))] == \
        [12, 7, 5, 6, 6]
    assert pooled_grid(8, 4, 4, 9216) == 4  # never upsampled (34 wanted)
    assert pooled_grid(4096, 7, 7, 9216) == 2 and pooled_grid(20000, 7, 7, 9216) == 1  # at least 1
    t = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    v = vectorize(t, pooled_dim=12)  # 3 channels -> s = 2: 2 x 2 means of 2 x 2 blocks, channel-major
    hand = t.view(2, 3, 2, 2, 2, 2).mean((3, 5)).reshape(2, 12)
    assert torch.equal(v, hand)
    assert torch.equal(vectorize(t), t.mean((2, 3))) and torch.equal(vectorize(t[:, :, 0, 0], 12), t[:, :, 0, 0])


def test_per_layer_table_equals_single_layer_runs_features_mode(tree_and_student, tmp_path, capsys):
    from compress_lit.linear import run_linear

    tree, ckpt, model = tree_and_student
    common = tree_overrides(tmp_path, ckpt, tree) + ["linear.mode=features", "linear.epochs=4"]
    layers = ["conv1", "conv3", "conv5", "fc7"]
    multi = run_linear(_compose("linear", common + [f"layers=[{','.join(layers)}]"]), tmp_path / "multi")
    printed = capsys.readouterr().out
    assert set(multi["layers"]) == set(layers) and multi["data"] == "imagefolder"
    for name in layers:
        single = run_linear(_compose("linear", common + [f"layer={name}"]), tmp_path / name)
        assert single["history"] == multi["layers"][name]["history"], name  # exactly the same run
        assert single["top1"] == multi["layers"][name]["top1"] and single["epochs"] == 4
        assert single["feature_dim"] == multi["layers"][name]["feature_dim"]
    # 8 channels at 16 x 16: 9216 / 8 -> 34 x 34 wanted, the map is not upsampled -> 8 x 16 x 16
    assert multi["layers"]["conv1"]["feature_dim"] == 8 * 16 * 16
    assert multi["layers"]["conv5"]["feature_dim"] == 32 * 4 * 4 and multi["layers"]["fc7"]["feature_dim"] == 32
    # the features the heads were scored on: conv1 of the first val image, pooled by hand
    saved = np.load(tmp_path / "multi" / "features_conv1.npz")
    assert saved["train_x"].shape == (18, 2048) and saved["test_x"].shape == (9, 2048)
    from compress_lit.data import build_datamodule
    from compress_lit.evaluation.loading import resolve_data_config

    dm = build_datamodule(resolve_data_config(None, _compose("linear", common).data))
    x = dm.val_dataset[0][0][None]
    with torch.no_grad():
        assert np.allclose(saved["test_x"][0], model.forward_features(x, ("conv1",))["conv1"].flatten().numpy(),
                           atol=1e-5)
    # the table: a column per layer, the best (highest final top-1) in bold
    best = max(layers, key=lambda n: (multi["layers"][n]["top1"], -layers.index(n)))
    assert multi["best_layer"] == best
    head, rule, row, dims = printed.strip().splitlines()[:4]
    assert [c.strip() for c in head.strip("|").split("|")][1:] == layers
    assert "final epoch (4)" in head and "centre crop" in head
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert cells[layers.index(best)] == f"**{multi['layers'][best]['top1']:.2f}**"
    # widths 8, 24, 48, 32, 32: conv3 is 48 x 4 x 4 (9216 / 48 -> 14 x 14 wanted, capped at the 4 x 4 map)
    assert [c.strip() for c in dims.strip("|").split("|")][1:] == ["2048", "768", "512", "32"]
    assert (tmp_path / "multi" / "linear_results.md").read_text().strip() == multi["table"].strip()
    assert json.loads((tmp_path / "multi" / "linear_results.json").read_text())["best_layer"] == best


def test_per_layer_equals_single_layer_runs_full_mode(tree_and_student, tmp_path):
    from compress_lit.linear import run_linear

    tree, ckpt, _ = tree_and_student
    common = tree_overrides(tmp_path, ckpt, tree) + ["linear.mode=full", "linear.epochs=2", "cache=false"]
    multi = run_linear(_compose("linear", common + ["layer=all"]), tmp_path / "all")
    assert list(multi["layers"]) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]
    for name in ("conv2", "fc6"):
        single = run_linear(_compose("linear", common + [f"layer={name}"]), tmp_path / name)
        assert single["history"] == pytest.approx(multi["layers"][name]["history"], abs=1e-9), name
    assert all(len(r["history"]) == 2 for r in multi["layers"].values())


def test_layer_names_are_checked_before_any_data(tree_and_student, tmp_path):
    from compress_lit.linear import run_linear

    tree, ckpt, _ = tree_and_student
    common = tree_overrides(tmp_path, ckpt, tree) + ["linear.mode=features", "linear.epochs=1"]
    with pytest.raises(ConfigError, match=r"layers=\['conv1', 'conv9'\]: alexnet has no layer 'conv9'"):
        run_linear(_compose("linear", common + ["layers=[conv1,conv9]"]), tmp_path / "bad")
    with pytest.raises(ConfigError, match="both set"):
        run_linear(_compose("linear", common + ["layer=conv1", "layers=[conv2]"]), tmp_path / "bad2")
    from compress_lit.data import DatasetError

    with pytest.raises(DatasetError, match=r"^data.root is required"):  # the preset leaves the root to the user
        run_linear(_compose("linear", [f"checkpoint={ckpt}", "data=places205"]), tmp_path / "bad3")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


def test_resnet_per_layer_means_its_stages(tmp_path):
    from compress_lit.evaluation.per_layer import resolve_layers

    model = build_backbone("resnet18", small_input=True, width_multiplier=0.125)
    assert resolve_layers(model, "all", None, "resnet18") == ["stem", "layer1", "layer2", "layer3", "layer4", "pool"]
    assert resolve_layers(model, None, ["all"]) == list(model.layer_names)
    assert resolve_layers(model, None, None) == [None]


def test_table_marks_the_best_layer_and_its_ties():
    from compress_lit.evaluation.per_layer import best_layer, per_layer_table

    res = {"conv1": {"top1": 50.0, "epochs": 40, "feature_dim": 9216}, "conv4": {"top1": 70.0, "epochs": 40},
           "fc7": {"top1": 70.0, "epochs": 40}}
    table = per_layer_table(res, "student", ten_crop=True)
    row = table.splitlines()[2]
    assert [c.strip() for c in row.strip("|").split("|")] == ["student", "50.00", "**70.00**", "**70.00**"]
    assert best_layer(res) == "conv4" and "best layer: conv4 (70.00%, in bold; tied: fc7)" in table
    assert "10-crop" in table.splitlines()[0] and table.rstrip().endswith("final epoch (10-crop)")
