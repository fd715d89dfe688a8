"""The Table-1 protocol's parts: the teacher's conv net, the validation split carved from the train split, the
raw-pixel floor row, the teacher's hash check, the reference rows, the claim check (gap closed, ranking), the best
marks, parallel steps and the calibration table."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from compress_lit.reproduction import run as rp
from compress_lit.reproduction import runs as rp_runs
from compress_lit.reproduction import settings as rp_settings
from compress_lit.reproduction import tables as rp_tables
from compress_lit.reproduction import teacher as rp_teacher
from compress_lit.runtime.config import DataConfig
from compress_lit.data import DatasetError, build_datamodule
from compress_lit.evaluation.pixels import RawPixels
from compress_lit.models import build_backbone
from compress_lit.teachers.cache import compare_meta, data_identity

pytestmark = pytest.mark.usefixtures("one_thread")


def _preset(name="full", **over):
    from hydra import compose, initialize_config_dir

    from compress_lit.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="reproduce", overrides=[f"reproduce_preset={name}",
                                                           *[f"{k}={v}" for k, v in over.items()]])


# ---------------------------------------------------------------------------------------------- the conv net
def test_convnet_stages_embedding_and_layers():
    m = build_backbone("convnet", small_input=True).eval()
    x = torch.randn(2, 3, 28, 28)
    feats = m.forward_features(x, ("stage1", "stage2", "stage3", "stage4", "pool"))
    assert [tuple(feats[f"stage{i}"].shape[1:]) for i in range(1, 5)] == [(64, 28, 28), (128, 14, 14),
                                                                         (256, 7, 7), (512, 3, 3)]
    assert m.embed_dim == 512 and torch.equal(m(x), feats["stage4"].mean((2, 3)))
    half = build_backbone("convnet", small_input=True, width_multiplier=0.5)
    assert half.embed_dim == 256
    with pytest.raises(ValueError, match="small-input"):
        build_backbone("convnet", small_input=False)


# ----------------------------------------------------------------------------------------- the holdout split
def _digits(**kw):
    return build_datamodule(OmegaConf.structured(DataConfig(name="digits", image_size=8, num_workers=0, **kw)))


def test_holdout_is_carved_from_the_train_split_and_the_test_split_is_not_read():
    plain, held = _digits(), _digits(holdout=300)
    plain.setup("fit")
    held.setup("fit")
    n = plain.num_train
    assert held.num_val == 300 and held.num_train == n - 300
    train_imgs = {tuple(x.flatten().tolist()) + (int(y),) for x, y, _ in plain.train_eval_dataloader().dataset}
    rest = [tuple(x.flatten().tolist()) + (int(y),) for x, y, _ in held.train_eval_dataloader().dataset]
    val = [tuple(x.flatten().tolist()) + (int(y),) for x, y, _ in held.val_dataloader().dataset]
    # both come from the plain train split (digits has duplicates: compare as multisets of the plain split)
    assert set(rest) <= train_imgs and set(val) <= train_imgs
    assert sorted(rest + val) == sorted(tuple(x.flatten().tolist()) + (int(y),)
                                        for x, y, _ in plain.train_eval_dataloader().dataset)
    sub = _digits(holdout=300, train_subset=500)
    sub.setup("fit")
    assert sub.num_train == 500 and sub.num_val == 300
    with pytest.raises(DatasetError, match=r"data.holdout=5000"):
        bad = _digits(holdout=5000)
        bad.setup("fit")


def test_eval_full_train_scores_on_the_whole_split_while_training_keeps_the_subset():
    for holdout in (None, 300):
        full, sub = _digits(holdout=holdout), _digits(holdout=holdout, train_subset=500, eval_full_train=True)
        full.setup("fit")
        sub.setup("fit")
        assert sub.num_train == 500 and len(sub.train_dataset_eval) == 500  # training, caches and CC: the subset
        assert len(sub.bank_dataset) == full.num_train  # the evaluation's train side: the whole (held-in) split
        assert torch.equal(sub.bank_dataset.images, full.train_dataset_eval.images)
        assert torch.equal(sub.val_dataset.images, full.val_dataset.images)
    plain = _digits(train_subset=500)
    assert plain.bank_dataset is plain.train_dataset_eval  # default: the training images themselves


def test_eval_full_train_1nn_equals_an_independent_one_on_the_whole_split():
    from compress_lit.evaluation.suite import evaluate_models

    dm, whole = _digits(train_subset=300, eval_full_train=True), _digits()
    dm.setup("fit")
    whole.setup("fit")
    res = evaluate_models({"raw pixels": RawPixels(grey=True)}, dm, ks=(1,), cluster_seeds=0, linear=False)
    tr = np.stack([x[0].flatten().numpy() for x, _, _ in whole.train_dataset_eval]).astype(np.float64)
    ty = np.array([int(y) for _, y, _ in whole.train_dataset_eval])
    te = np.stack([x[0].flatten().numpy() for x, _, _ in whole.val_dataset]).astype(np.float64)
    tey = np.array([int(y) for _, y, _ in whole.val_dataset])
    tr /= np.linalg.norm(tr, axis=1, keepdims=True)
    te /= np.linalg.norm(te, axis=1, keepdims=True)
    want = 100.0 * np.mean(ty[(te @ tr.T).argmax(1)] == tey)
    assert res["raw pixels"]["1-NN"] == pytest.approx(want, abs=1e-6)
    small = evaluate_models({"raw pixels": RawPixels(grey=True)}, _digits(train_subset=300), ks=(1,),
                            cluster_seeds=0, linear=False)
    assert small["raw pixels"]["1-NN"] < want  # a 300-image bank is a different, weaker protocol


def test_holdout_is_a_start_up_error_when_not_positive():
    from hydra import compose, initialize_config_dir

    from compress_lit.runtime.config import ConfigError, validate_train
    from compress_lit.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data.holdout=0"])
    with pytest.raises(ConfigError, match=r"^data.holdout=0 is invalid"):
        validate_train(cfg)


def test_a_teacher_cache_of_a_holdout_split_does_not_pass_for_the_whole_split():
    whole = OmegaConf.structured(DataConfig(name="fashion_mnist", train_subset=10000))
    held = OmegaConf.structured(DataConfig(name="fashion_mnist", train_subset=10000, holdout=10000))
    a, b = {"data": data_identity(whole, 10000)}, {"data": data_identity(held, 10000)}
    assert "holdout" not in a["data"]  # caches built before the key existed stay valid
    assert compare_meta(a, a) == [] and compare_meta(b, b) == []
    assert any(p.startswith("data.holdout") for p in compare_meta(b, a))
    assert any(p.startswith("data.holdout") for p in compare_meta(a, b))


# ------------------------------------------------------------------------------------------- the pixel floor
def test_raw_pixel_row_equals_an_independent_cosine_1nn():
    from compress_lit.evaluation.suite import evaluate_models

    dm = _digits()
    dm.setup("fit")
    res = evaluate_models({"raw pixels": RawPixels(grey=True)}, dm, ks=(1,), cluster_seeds=0, linear=False)
    # independent: cosine 1-NN on the normalised grey images with numpy
    tr = np.stack([x[0].flatten().numpy() for x, _, _ in dm.train_eval_dataloader().dataset])
    ty = np.array([int(y) for _, y, _ in dm.train_eval_dataloader().dataset])
    te = np.stack([x[0].flatten().numpy() for x, _, _ in dm.val_dataloader().dataset])
    tey = np.array([int(y) for _, y, _ in dm.val_dataloader().dataset])
    tr /= np.linalg.norm(tr, axis=1, keepdims=True)
    te /= np.linalg.norm(te, axis=1, keepdims=True)
    want = 100.0 * np.mean(ty[(te @ tr.T).argmax(1)] == tey)
    assert res["raw pixels"]["1-NN"] == pytest.approx(want, abs=1e-6)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(RawPixels(grey=True)(x), x[:, 0].flatten(1)) and RawPixels()(x).shape == (2, 48)


# ------------------------------------------------------------------------------------------------ the teacher
def _fake_teacher_step(calls):
    def fake(module, args, runs, tag, dry, *a, **k):
        if module == "compress_lit.evaluate":  # the teacher check (tested on its own below)
            return runs / tag, None
        calls.append(args)
        out = Path(next(x.split("=", 1)[1] for x in args if x.startswith("output=")))
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {"w": torch.full((2,), float(len(calls)))}, "callbacks": {"dirpath": str(runs)}},
                   out)
        return runs / f"{tag}-x", {"fashion_mnist_teacher (MoCo v2)": {"1-NN": 85.0}}
    return fake


def test_teacher_is_built_once_recorded_by_hash_reused_and_a_changed_file_refused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(rp_runs, "_run_step", _fake_teacher_step(calls))
    cfg = _preset(out_dir=str(tmp_path))
    ckpt, res = rp.ensure_teacher(cfg, tmp_path)
    manifest = json.loads((tmp_path / "teacher" / "full_teacher.json").read_text())
    import hashlib

    assert manifest["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest() and len(calls) == 1
    assert manifest["command"].startswith("python -m compress_lit.pretrain pretrain_experiment=fashion_mnist_teacher")
    assert rp.ensure_teacher(cfg, tmp_path)[1] == res and len(calls) == 1  # reused, not rebuilt
    ckpt.write_bytes(b"someone else's weights")
    with pytest.raises(rp_runs.StepFailed, match=r"does not match the SHA-256 recorded in .*full_teacher.json"):
        rp.ensure_teacher(cfg, tmp_path)
    ckpt.unlink()  # missing: rebuilt
    rp.ensure_teacher(cfg, tmp_path)
    assert len(calls) == 2
    # the calibration borrows the full preset's teacher and never builds one
    cal = _preset("calibrate", out_dir=str(tmp_path))
    assert rp.ensure_teacher(cal, tmp_path)[0] == ckpt and len(calls) == 2
    with pytest.raises(rp_runs.StepFailed, match="make reproduce-teacher first"):
        rp.ensure_teacher(cal, tmp_path / "elsewhere")


def test_weights_hash_ignores_what_lightning_stores_beside_the_weights(tmp_path):
    import hashlib

    w = torch.tensor([[1.0, -2.0]]), torch.tensor([3], dtype=torch.int64)
    a, b, c = tmp_path / "a.ckpt", tmp_path / "b.ckpt", tmp_path / "c.ckpt"
    torch.save({"state_dict": {"net.w": w[0], "net.n": w[1]}, "callbacks": {"dirpath": "/checkout/one"}}, a)
    torch.save({"state_dict": {"net.n": w[1], "net.w": w[0]}, "callbacks": {"dirpath": "/another/checkout"}}, b)
    torch.save({"state_dict": {"net.w": torch.tensor([[1.0, -2.5]]), "net.n": w[1]}}, c)
    assert rp_teacher._sha256(a) != rp_teacher._sha256(b)  # the files differ (the run's path) ...
    assert rp_teacher.weights_sha256(a) == rp_teacher.weights_sha256(b)  # ... the weights do not
    assert rp_teacher.weights_sha256(c) != rp_teacher.weights_sha256(a)  # one changed number is another teacher
    # by hand: name, dtype, shape, then the raw bytes (little-endian), keys in sorted order
    h = hashlib.sha256()
    h.update(b"net.n\0torch.int64\0(1,)\0" + (3).to_bytes(8, "little"))
    h.update(b"net.w\0torch.float32\0(1, 2)\0" + np.array([1.0, -2.0], "<f4").tobytes())
    assert rp_teacher.weights_sha256(a) == h.hexdigest()


def test_the_released_teacher_is_its_backbone_with_the_same_weights_hash_and_loads_as_a_teacher(tmp_path):
    from compress_lit.teachers.formats.compress_lit import map_compress_lit

    net = build_backbone("convnet", small_input=True, width_multiplier=0.25)
    sd = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    full = {"state_dict": {**sd, **{f"backbone_momentum.{k}": v + 1 for k, v in net.state_dict().items()},
                           "queue": torch.randn(8, 4), "projector.0.weight": torch.randn(4, 4)},
            "optimizer_states": [{"state": {0: torch.randn(100)}}], "callbacks": {"dirpath": "/a/checkout"},
            "epoch": 19, "global_step": 4680}
    ckpt = tmp_path / "full_teacher.ckpt"
    torch.save(full, ckpt)
    before, size = rp_teacher.weights_sha256(ckpt), ckpt.stat().st_size
    rp_teacher.release_teacher(ckpt)
    rel = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert set(rel) == {"state_dict", "epoch", "global_step"} and rel["global_step"] == 4680
    assert sorted(rel["state_dict"]) == sorted(sd) and all(torch.equal(rel["state_dict"][k], sd[k]) for k in sd)
    assert ckpt.stat().st_size < size and rp_teacher.weights_sha256(ckpt) == before  # the same teacher
    fresh = build_backbone("convnet", small_input=True, width_multiplier=0.25)
    mapped = {dst: v for _, dst, v in map_compress_lit(rel, fresh) if dst is not None}
    fresh.load_state_dict(mapped)  # every backbone weight, nothing else
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in net.state_dict().items())
    # training state beside the backbone is not the teacher; a backbone weight is
    full["state_dict"]["queue"] = torch.zeros(8, 4)
    torch.save(full, tmp_path / "other_queue.ckpt")
    assert rp_teacher.weights_sha256(tmp_path / "other_queue.ckpt") == before
    first = next(iter(sd))
    full["state_dict"][first] = sd[first] + 1e-3
    torch.save(full, tmp_path / "other_weights.ckpt")
    assert rp_teacher.weights_sha256(tmp_path / "other_weights.ckpt") != before


def test_a_different_teacher_at_the_same_path_never_reuses_student_runs(tmp_path):
    cfg = _preset(out_dir=str(tmp_path))
    one, two = rp_runs.plan_steps(cfg, Path("t.ckpt"), "a" * 64), rp_runs.plan_steps(cfg, Path("t.ckpt"), "b" * 64)
    for s1, s2 in zip(one, two):
        k1, k2 = rp_runs.step_key(s1.module, s1.args, s1.teacher), rp_runs.step_key(s2.module, s2.args, s2.teacher)
        assert s1.args == s2.args  # the command lines are the same: only the teacher's weights differ
        assert (k1 == k2) == (s1.method == "moco_scratch")  # MoCo from scratch never reads the teacher
    st = next(s for s in one if s.method == "compress_2q")
    done = tmp_path / "runs" / f"{st.tag}-{rp_runs.step_key(st.module, st.args, st.teacher)}" / "results.json"
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"student (x)": {"1-NN": 70.0}}))
    assert rp_runs._run_step(st.module, st.args, tmp_path / "runs", st.tag, False, run=False, teacher="a" * 64)[1]
    assert rp_runs._run_step(st.module, st.args, tmp_path / "runs", st.tag, False, run=False, teacher="b" * 64)[1] is None


def test_teacher_manifest_records_the_weights_hash(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(rp_runs, "_run_step", _fake_teacher_step(calls))
    cfg = _preset(out_dir=str(tmp_path))
    ckpt, _ = rp.ensure_teacher(cfg, tmp_path)
    mpath = tmp_path / "teacher" / "full_teacher.json"
    manifest = json.loads(mpath.read_text())
    assert manifest["weights_sha256"] == rp_teacher.weights_sha256(ckpt) == rp_teacher.teacher_weights(cfg, tmp_path)
    del manifest["weights_sha256"]  # a manifest written before the weights hash: computed from the file
    mpath.write_text(json.dumps(manifest))
    assert rp_teacher.teacher_weights(cfg, tmp_path) == rp_teacher.weights_sha256(ckpt)
    assert rp_teacher.teacher_weights(_preset(out_dir=str(tmp_path / "none")), tmp_path / "none") == ""


def test_teacher_part_builds_only_the_teacher(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(rp_runs, "_run_step", _fake_teacher_step(calls))
    assert "teacher" in rp.run_reproduce(_preset(out_dir=str(tmp_path), part="teacher"))
    assert len(calls) == 1 and not list((tmp_path / "runs").iterdir())


# -------------------------------------------------------------------------------------- the teacher's bars
def test_pixels_format_of_evaluate_equals_an_independent_numpy_evaluation(tmp_path):
    """``compress_lit.evaluate model_format=pixels``: its features are the normalised images themselves and its
    1-NN is numpy's cosine 1-NN on them."""
    from hydra import compose, initialize_config_dir

    from compress_lit.evaluate import CONF_DIR, run_evaluate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["model_format=pixels", "data=digits", "eval=[knn]",
                                                         "progress=false", "cache=false"])
    res = run_evaluate(cfg, tmp_path)
    from compress_lit.evaluation.loading import resolve_data_config

    dm = build_datamodule(resolve_data_config(None, cfg.data))  # the digits preset's images (16 px)
    dm.setup("fit")
    f = np.load(tmp_path / "features.npz")
    tr = np.stack([x[0].flatten().numpy() for x, _, _ in dm.train_eval_dataloader().dataset])
    te = np.stack([x[0].flatten().numpy() for x, _, _ in dm.val_dataloader().dataset])
    ty = np.array([int(y) for _, y, _ in dm.train_eval_dataloader().dataset])
    tey = np.array([int(y) for _, y, _ in dm.val_dataloader().dataset])
    np.testing.assert_allclose(f["train_x"], tr, atol=1e-6)
    np.testing.assert_allclose(f["test_x"], te, atol=1e-6)
    trn, ten = tr / np.linalg.norm(tr, axis=1, keepdims=True), te / np.linalg.norm(te, axis=1, keepdims=True)
    want = 100.0 * np.mean(ty[(ten @ trn.T).argmax(1)] == tey)
    assert res["knn"]["top1_k1"] == pytest.approx(want, abs=1e-6) and res["layer"] == "image"
    from compress_lit.runtime.config import ConfigError
    from compress_lit.evaluation.run import _check

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        bad = compose(config_name="evaluate", overrides=["model_format=pixels", "data=digits", "layer=conv1"])
    with pytest.raises(ConfigError, match=r"^layer=conv1 is meaningless with model_format=pixels"):
        _check(bad)


def test_teacher_bars_by_hand_on_both_probes():
    from compress_lit.reproduction.teacher_check import bars_lines, evaluate_row, teacher_bars

    row = evaluate_row({"knn": {"top1_k1": 86.0, "top5_k1": 99.0, "top1_k20": 85.0},
                        "cluster": {"acc_mean": 60.0, "acc_std": 2.0}, "linear": {"top1": 89.5}})
    assert row == {"1-NN": 86.0, "20-NN": 85.0, "cluster": 60.0, "cluster_std": 2.0, "linear": 89.5}
    check = {"args": ["data=x"], "num_train": 60000, "num_val": 10000, "teacher": row,
             "raw pixels": {"1-NN": 85.5, "linear": 84.5}}
    bars = OmegaConf.structured(rp_settings.TeacherBars())
    table = {"alexnet_small": _rows(**{"raw pixels": 82.0, rp_tables.TEACHER: 82.5, rp_tables.SCRATCH: 70.0}),
             "resnet18_small": _rows(**{"raw pixels": 82.0, rp_tables.TEACHER: 82.5, rp_tables.SCRATCH: 80.0})}
    table["alexnet_small"]["raw pixels"]["linear"] = [84.0, 0.0, 1]
    table["alexnet_small"][rp_tables.TEACHER]["linear"] = [87.0, 0.0, 1]
    got = teacher_bars(check, table, bars, rp_tables.TEACHER, rp_tables.SCRATCH)
    assert [(b["need"], b["check"], b["check_ok"], b["table"], b["table_ok"]) for b in got] == [
        (4.0, 5.0, True, 3.0, False),  # linear: 89.5 - 84.5 on the check; 87 - 84 on the table
        (-1.0, 0.5, True, 0.5, True),  # 1-NN: 86 - 85.5; 82.5 - 82
        (3.0, None, None, 12.5, True),  # AlexNet: 82.5 - 70
        (3.0, None, None, 2.5, False)]  # ResNet-18: 82.5 - 80
    md = "\n".join(bars_lines(check, got, "10,000-image bank"))
    assert "| linear: teacher - raw pixels | ≥ +4.0 | +5.00 (cleared) | +3.00 (missed) |" in md
    assert "| 1-NN: teacher - MoCo from scratch (resnet18_small) | ≥ +3.0 | – | +2.50 (missed) |" in md
    assert "all 60000 train images as bank and probe set" in md and "| raw pixels | 85.50 | – | – | 84.50 |" in md


def test_teacher_check_runs_teacher_and_pixels_per_teacher_hash_and_reaches_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(rp, "ensure_teacher", lambda cfg, out: (Path("t.ckpt"), None))
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "full_teacher.json").write_text(json.dumps({"sha256": "ab" * 32}))
    seen = []

    def fake(module, args, runs, tag, dry, threads=None, log_file=False, run=True, **k):
        if module == "compress_lit.evaluate":
            seen.append((runs, tag, args, run))
            top = 88.0 if "checkpoint=t.ckpt" in args else 83.0
            return runs / tag, {"num_train": 60000, "num_val": 10000, "knn": {"top1_k1": top, "top1_k20": top},
                                "linear": {"top1": top}}
        return runs / tag, None

    monkeypatch.setattr(rp_runs, "_run_step", fake)
    cfg = _preset(out_dir=str(tmp_path), part="table", students="[alexnet_small]")
    rp.run_reproduce(cfg)
    assert [(r.name, t, a[0], run) for r, t, a, run in seen] == [
        ("check-" + "ab" * 6, "check-teacher", "checkpoint=t.ckpt", False),
        ("check-" + "ab" * 6, "check-raw_pixels", "model_format=pixels", False)]
    # the teacher's file is read through its preset (format and architecture); both runs share the check's args
    teacher_args = ["model_format=compress_lit", "model.arch=convnet", "model.name=fashion_mnist",
                    "model.small_input=true", "model.width_multiplier=1.0"]
    assert seen[0][2][1:] == [*teacher_args, *cfg.teacher_check.args]
    assert seen[1][2][1:] == list(cfg.teacher_check.args)
    assert "data.train_subset=10000" not in cfg.teacher_check.args  # the whole train split
    out = json.loads((tmp_path / "table1_fashion_mnist.json").read_text())
    assert out["teacher_check"]["teacher"]["linear"] == 88.0
    assert out["teacher_bars"][0]["check"] == 5.0 and out["teacher_bars"][0]["check_ok"] is True
    assert "## The teacher's bars" in (tmp_path / "table1_fashion_mnist.md").read_text()


# ------------------------------------------------------------------------------------- steps and references
def test_supervised_runs_evaluate_the_reference_rows():
    cfg = _preset(part="main")
    steps = rp_runs.plan_steps(cfg, Path("t.ckpt"))
    assert len(steps) == 2 * 11 * 3 and {s.seed for s in steps} == {0, 1, 2}
    assert [s.run for s in steps if s.method in ("seed", "simreg", "disco")] == [False] * 18
    sup = [s for s in steps if s.method == "supervised"]
    assert [s.references for s in sup[:3]] == [("random", "teacher", "pixels"), ("random",), ("random",)]
    assert {"eval.include_teacher=true", "eval.pixel_baseline=true", "eval.random_baseline=true"} <= set(sup[0].args)
    other = next(s for s in steps if s.method == "compress_2q")
    assert "eval.include_teacher=false" in other.args and "eval.pixel_baseline=true" not in other.args


def test_table_takes_each_row_from_its_run_and_orders_references_first():
    cfg = _preset(students="[alexnet_small]", methods="[moco_scratch,supervised,compress_2q]", family_methods="[]",
                  seeds="[0,1]")
    steps = rp_runs.plan_steps(cfg, Path("t.ckpt"))

    def res(st):
        v = {"moco_scratch": 80.0, "supervised": 90.0, "compress_2q": 83.0}[st.method] + st.seed
        out = {f"student ({st.method})": {m: v for m in rp_settings.METRICS}}
        if "random" in st.references:
            out["student, random init"] = {m: 70.0 + st.seed for m in rp_settings.METRICS}
        if "teacher" in st.references:
            out["teacher (fashion_mnist)"] = {m: 85.0 for m in rp_settings.METRICS}
        if "pixels" in st.references:
            out["raw pixels"] = {m: 81.0 for m in rp_settings.METRICS}
        return out

    table = rp.table_rows(cfg, steps, [res(s) for s in steps])["alexnet_small"]
    assert list(table) == ["raw pixels", "random init", rp_tables.TEACHER, "supervised", rp_tables.SCRATCH, "CompReSS-2q"]
    assert table["raw pixels"]["1-NN"] == [81.0, 0.0, 1] and table[rp_tables.TEACHER]["1-NN"] == [85.0, 0.0, 1]
    assert table["random init"]["1-NN"][:2] == [70.5, pytest.approx(math.sqrt(0.5))]
    assert table["CompReSS-2q"]["1-NN"][0] == 83.5


# ------------------------------------------------------------------------------------------- the claim check
def _rows(**means):
    return {k: {m: [v, 0.5, 3] for m in rp_settings.METRICS} for k, v in means.items()}


def test_gap_closed_and_ranking_by_hand():
    rows = _rows(**{"raw pixels": 81.0, rp_tables.TEACHER: 86.0, "supervised": 88.0, rp_tables.SCRATCH: 82.0,
                    "CompReSS-2q": 84.0, "CompReSS-1q": 85.0, "Regression": 83.0, "SEED": 85.5})
    c = rp_tables.claim_check(rows)
    assert c["gap_points"] == 4.0
    assert c["gap_closed"] == {"SEED": 0.875, "CompReSS-1q": 0.75, "CompReSS-2q": 0.5, "Regression": 0.25}
    assert c["ranking"][0] == "SEED" and c["compress_rank"] == 2 and c["compress_first"] is False
    # the paper's own claim leaves out the later family: CompReSS leads Regression there
    assert c["paper_ranking"] == ["CompReSS-1q", "CompReSS-2q", "Regression"] and c["paper_compress_first"] is True
    text = "\n".join(rp_tables.claim_lines("alexnet_small", c))
    assert "| SEED | 88% | 1 |" in text
    assert ("CompReSS ranks first among the paper's methods (its baselines and CompReSS), as the paper claims."
            in text)
    assert ("CompReSS does not rank first with the later family (SEED, SimReg, DisCo): SEED leads; CompReSS's "
            "better variant is #2 of 4." in text)
    rows["SEED"] = {m: [84.5, 0.1, 3] for m in rp_settings.METRICS}
    assert rp_tables.claim_check(rows)["compress_first"] is True
    rows.pop("SEED")
    plain = rp_tables.claim_check(rows)
    assert "paper_ranking" not in plain
    assert rp_tables.claim_lines("s", plain)[-1] == ("CompReSS ranks first among the distillation methods, as the paper "
                                              "claims.")
    assert rp_tables.claim_check(_rows(**{rp_tables.SCRATCH: 80.0})) is None
    early = rp_tables.claim_check(_rows(**{rp_tables.TEACHER: 86.0, rp_tables.SCRATCH: 82.0, "Regression": 83.0}))  # a partial table
    assert early["compress_rank"] is None and early["compress_first"] is False
    assert rp_tables.claim_lines("s", early)[-1] == "No CompReSS row yet: the claim cannot be checked."


def test_best_self_supervised_row_is_marked_and_references_never_are():
    rows = _rows(**{"raw pixels": 99.0, rp_tables.TEACHER: 98.0, "supervised": 97.0, rp_tables.SCRATCH: 80.0,
                    "CompReSS-1q": 85.0, "CRD": 84.0})
    assert rp_tables.best_rows(rows) == {m: {"CompReSS-1q"} for m in rp_settings.METRICS}
    md = rp_tables.markdown_table({"alexnet_small": rows}, {"data": "d", "command": "c", "teacher": "t",
                                                     "student_args": "s", "seeds": [0, 1, 2]})
    assert "| CompReSS-1q | **85.00 ± 0.50** |" in md and "| raw pixels | 99.00 ± 0.50 |" in md
    assert "CompReSS ranks first among the distillation methods" in md and "| CompReSS-1q | 28% | 1 |" in md and "| CRD | 22% | 2 |" in md  # 5/18, 4/18


# ----------------------------------------------------------------------------------- parallel steps, calibration
def test_parallel_steps_run_each_command_once_after_the_cache_is_built_alone(tmp_path, monkeypatch):
    import threading

    order, lock = [], threading.Lock()

    def fake(module, args, runs, tag, dry, threads=None, log_file=False, run=True, **k):
        with lock:
            order.append((tag, threads, log_file))
        return runs / tag, {"student (x)": {"1-NN": 1.0}}

    monkeypatch.setattr(rp_runs, "_run_step", fake)
    monkeypatch.setattr(rp_runs, "build_teacher_cache", lambda step, runs: order.append(("cache for " + step.tag,
                                                                                    None, True)))
    cfg = _preset(out_dir=str(tmp_path), jobs=2)
    steps = [rp_runs.Step("a", "compress_lit.train", ["method=supervised"], True, method="supervised"),
             rp_runs.Step("b", "compress_lit.train", ["method=compress_2q"], True, method="compress_2q"),
             rp_runs.Step("b-again", "compress_lit.train", ["method=compress_2q"], True, method="compress_2q"),
             rp_runs.Step("c", "compress_lit.train", ["method=crd"], True, method="crd")]
    res = rp_runs.execute(cfg, steps, tmp_path)
    assert order[0][0] == "cache for b"  # the cache of the first cached method, alone, before any run
    assert sorted(t for t, _, _ in order[1:]) == ["a", "b", "c"]  # the duplicate ran once
    # every run, the cached ones included, with the pool's thread count: none depends on who built the cache
    assert all(th == max(1, (__import__("os").cpu_count() or 1) // 2) and lf for t, th, lf in order[1:])
    assert res[2] is res[1]


def test_calibration_marks_each_groups_best_on_its_metric(tmp_path, monkeypatch):
    from compress_lit.runtime.config import ConfigError

    cal = _preset("calibrate", out_dir=str(tmp_path))
    sup = [c.label for c in cal.candidates if c.method == "supervised"]
    assert sup == ["10 epochs", "20 epochs", "40 epochs", "80 epochs", "160 epochs"]  # the preset's convergence search
    monkeypatch.setattr(rp, "ensure_teacher", lambda cfg, out: (Path("t.ckpt"), None))
    lr = {"optim.lr=0.02": 80.0, "optim.lr=0.1": 83.0}

    def fake(module, args, runs, tag, dry, *a, **k):
        v = 82.0
        for a_ in args:
            v = lr.get(a_, v)
        if "method.temperature=0.02" in args:
            v = 20.0  # a collapse
        # supervised accuracy still rising with epochs, by less and less: 85 / 87.8 / 88.0 / 88.2 / 88.3
        lin = {"optim.epochs=20": 87.8, "optim.epochs=40": 88.0, "optim.epochs=80": 88.2, "optim.epochs=160": 88.3}
        lin = next((lin[a_] for a_ in args if a_ in lin), 85.0)
        return runs / tag, {"student (x)": {"1-NN": v, "20-NN": v, "cluster": 1.0, "linear": lin}}

    monkeypatch.setattr(rp_runs, "_run_step", fake)
    monkeypatch.setattr(rp_runs, "build_teacher_cache", lambda step, runs: None)
    groups = rp.run_calibration(cal, tmp_path, tmp_path)
    chosen = {g: [c["label"] for c in cands if c["chosen"]] for g, cands in groups.items()}
    assert chosen["learning rate (CompReSS-2q, T 0.04, m 0.99)"] == ["lr 0.1"]  # 83 > 82
    assert chosen["CompReSS temperature (2q, lr 0.05)"] == ["T 0.04 (the paper's)"]
    # a convergence search (within 0.5): the best is 160 epochs (88.3), the first within 0.5 of it is 20 (87.8)
    assert next(v for g, v in chosen.items() if g.startswith("supervised")) == ["20 epochs"]
    md = (tmp_path / "calibration_fashion_mnist.md").read_text()
    assert "| T 0.02 | `method.temperature=0.02` | 20.00 | 20.00 | 85.00 |  |" in md  # one seed: no "± 0.00"
    assert "one seed (no spread)" in md and "the test split is never read" in md
    assert "(chosen: the first setting within 0.5 points of the best linear.)" in md
    assert "| 80 epochs | `optim.epochs=80` | 82.00 | 82.00 | 88.20 |  |" in md
    assert "(chosen: the best 1-NN.)" in md
    # every candidate of a group must share metric and within; a negative tolerance is refused
    mixed = cal
    mixed.candidates[-1].within = 1.0
    with pytest.raises(ConfigError, match=r"candidates\[\d+\] \('160 epochs'\).*same metric and within"):
        rp.run_calibration(mixed, tmp_path, tmp_path)
    mixed.candidates[0].within = -1.0
    with pytest.raises(ConfigError, match=r"candidates\[0\]\.within must be >= 0"):
        rp.run_calibration(mixed, tmp_path, tmp_path)
    bad = _preset("calibrate", out_dir=str(tmp_path), common_args="['data=fashion_mnist']")
    with pytest.raises(ConfigError, match="data.holdout"):
        rp.run_calibration(bad, tmp_path, tmp_path)


def test_method_args_reach_only_their_method():
    cfg = _preset(**{"+method_args": "{compress_2q: ['method.temperature=0.07']}"})
    _, two_q = rp_runs.step_command(cfg, "alexnet_small", "compress_2q", 0, Path("t.ckpt"))
    _, seed = rp_runs.step_command(cfg, "alexnet_small", "seed", 0, Path("t.ckpt"))
    assert "method.temperature=0.07" in two_q and "method.temperature=0.07" not in seed
    _, plain = rp_runs.step_command(_preset(), "alexnet_small", "compress_2q", 0, Path("t.ckpt"))
    assert [a for a in two_q if a != "method.temperature=0.07"] == plain  # nothing else changes (same run hashes)


def test_table_part_runs_nothing_and_says_the_table_is_partial(tmp_path, monkeypatch):
    monkeypatch.setattr(rp, "ensure_teacher", lambda cfg, out: (Path("t.ckpt"), {"t": {"1-NN": 86.0}}))
    ran = []

    def fake(module, args, runs, tag, dry, threads=None, log_file=False, run=True, **k):
        ran.append(run)
        if "method=supervised" in args and "seed=0" in args:
            return runs / tag, {"student (supervised)": {m: 90.0 for m in rp_settings.METRICS}}
        return runs / tag, None

    monkeypatch.setattr(rp_runs, "_run_step", fake)
    cfg = _preset(out_dir=str(tmp_path), part="table", students="[alexnet_small]")
    table = rp.run_reproduce(cfg)["alexnet_small"]
    assert ran and not any(ran)  # every step only read
    assert table["supervised"]["1-NN"] == [90.0, 0.0, 1]
    md = (tmp_path / "table1_fashion_mnist.md").read_text()
    assert "**Partial table**: 1 of 33 student runs have finished" in md


# ------------------------------------------------------------------------- the supervised reference's classifier
def _supervised_checkpoint(path, train_head: bool):
    """A method=supervised checkpoint in this project's layout (student.*, [train_head.*,] classifier.*, the
    run's config under hyper_parameters) with a random student and seeded random heads."""
    from hydra import compose, initialize_config_dir

    from compress_lit.models import build_from_config
    from compress_lit.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data=digits", "method=supervised"])
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    student = build_from_config(config["student"]).eval()
    dim = student.embed_dim
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    if train_head:
        state["train_head.weight"], state["train_head.bias"] = torch.randn(16, dim, generator=g), torch.zeros(16)
        dim = 16
    state["classifier.weight"], state["classifier.bias"] = torch.randn(10, dim, generator=g), torch.randn(10, generator=g)
    torch.save({"state_dict": state, "hyper_parameters": {"config": config}}, path)
    return student, state, config


@pytest.mark.parametrize("train_head", [False, True])
def test_supervised_classifier_accuracy_equals_a_direct_forward(tmp_path, train_head):
    from compress_lit.evaluation.classifier import classifier_accuracy
    from compress_lit.evaluation.loading import resolve_data_config

    student, state, config = _supervised_checkpoint(tmp_path / "last.ckpt", train_head)
    got = classifier_accuracy(tmp_path / "last.ckpt")
    dm = build_datamodule(resolve_data_config(config["data"], None))
    dm.setup("fit")
    xs = torch.stack([x for x, _, _ in dm.val_dataloader().dataset])
    ys = np.array([int(y) for _, y, _ in dm.val_dataloader().dataset])
    with torch.no_grad():
        e = student(xs).double()
        if train_head:
            e = e @ state["train_head.weight"].double().T + state["train_head.bias"].double()
        logits = e @ state["classifier.weight"].double().T + state["classifier.bias"].double()
    want = 100.0 * np.mean(logits.argmax(1).numpy() == ys)
    assert got["num_val"] == len(ys) and got["top1"] == pytest.approx(want, abs=1e-9)
    torch.save({"state_dict": {k: v for k, v in state.items() if k.startswith("student.")},
                "hyper_parameters": {"config": config}}, tmp_path / "no_head.ckpt")
    from compress_lit.runtime.config import ConfigError

    with pytest.raises(ConfigError, match="not a method=supervised run"):
        classifier_accuracy(tmp_path / "no_head.ckpt")


def test_supervised_rows_get_their_classifier_accuracy_once_per_run(tmp_path, monkeypatch):
    import compress_lit.evaluation.classifier as clf

    cfg = _preset(students="[alexnet_small]", methods="[supervised]", family_methods="[]", seeds="[0,1]")
    steps = rp_runs.plan_steps(cfg, Path("t.ckpt"), teacher="ab" * 32)  # a run's key includes the teacher's hash
    for st in steps:
        d = tmp_path / f"{st.tag}-{rp_runs.step_key(st.module, st.args, st.teacher)}"
        (d / "checkpoints").mkdir(parents=True)
        (d / "checkpoints" / "last.ckpt").write_bytes(b"x")
        (d / "results.json").write_text("{}")
    calls = []
    monkeypatch.setattr(clf, "classifier_accuracy", lambda p: calls.append(p) or {"top1": 88.0 + len(calls)})
    results = [{"student (supervised)": {m: 90.0 for m in rp_settings.METRICS}} for _ in steps]
    table = rp.table_rows(cfg, steps, results)
    rp.add_classifier_accuracy(table, steps, results, tmp_path)
    assert table["alexnet_small"]["supervised"]["classifier"] == [89.5, pytest.approx(math.sqrt(0.5)), 2]
    rp.add_classifier_accuracy(table, steps, results, tmp_path)
    assert len(calls) == 2  # kept in <run>/classifier.json, not recomputed
    md = rp_tables.markdown_table(table, {"data": "d", "command": "c", "teacher": "t", "student_args": "s", "seeds": [0, 1]})
    assert "its own classifier on the test split: top-1 89.50 ± 0.71 (2 runs)" in md


def test_the_teacher_cache_is_built_by_cache_features_with_the_steps_command_line(tmp_path, monkeypatch):
    import types

    calls = []

    def fake_run(cmd, env=None, stdout=None, stderr=None):
        calls.append((cmd, env))
        return types.SimpleNamespace(returncode=len(calls) - 1)  # the first call succeeds, the second fails

    monkeypatch.setattr(rp_runs.subprocess, "run", fake_run)
    st = rp_runs.Step("alexnet_small-regression-s0", "compress_lit.train", ["method=regression", "teacher.cached=true"],
                 True, method="regression", teacher="c" * 64)
    rp_runs.build_teacher_cache(st, tmp_path)
    cmd, env = calls[0]
    key = rp_runs.step_key(st.module, st.args, st.teacher)
    assert cmd[1:] == ["-m", "compress_lit.cache_features", "method=regression", "teacher.cached=true",
                       f"hydra.run.dir={tmp_path / f'teacher-cache-{key}'}"]
    assert env is None  # every thread: no OMP_NUM_THREADS of the pool
    assert not list(tmp_path.glob("*/results.json"))  # not a run of the table
    with pytest.raises(rp_runs.StepFailed, match="building the teacher cache failed.*step.log"):
        rp_runs.build_teacher_cache(st, tmp_path)
