"""A reproduction's progress file (run_records.py): finished runs recorded, restored as finished runs under their
own keys only, kept across a failure, and never read without ``progress=``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress_lit.reproduction import run as rp, runs as rp_runs
from compress_lit.runtime.config import ConfigError
from compress_lit.reproduction.records import load_progress, restore_progress, save_progress


def _finished(runs: Path, name: str, res: dict, **extra) -> Path:
    d = runs / name
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "last.ckpt").write_bytes(b"big")
    for fname, content in extra.items():
        (d / f"{fname}.json").write_text(json.dumps(content))
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_save_then_restore_gives_back_each_finished_run(tmp_path):
    runs = tmp_path / "runs"
    _finished(runs, "a-s0-0123456789", {"student (x)": {"1-NN": 81.5}}, step={"seconds": 12.5})
    _finished(runs, "b-s0-abcdefabcd", {"student (y)": {"1-NN": 70.0}}, classifier={"top1": 88.25})
    (runs / "c-s0-unfinished0").mkdir()  # no results.json: not a finished run
    progress = tmp_path / "progress.json"
    assert save_progress(runs, progress) == 2
    records = load_progress(progress)
    assert sorted(records) == ["a-s0-0123456789", "b-s0-abcdefabcd"]
    assert records["b-s0-abcdefabcd"] == {"results.json": {"student (y)": {"1-NN": 70.0}},
                                          "classifier.json": {"top1": 88.25}}
    assert records["a-s0-0123456789"]["step.json"] == {"seconds": 12.5}

    fresh = tmp_path / "elsewhere" / "runs"
    assert restore_progress(progress, fresh) == 2
    for name in records:
        for fname, content in records[name].items():
            assert json.loads((fresh / name / fname).read_text()) == content
    assert not (fresh / "a-s0-0123456789" / "checkpoints").exists()  # only the records travel

    # a run this machine has finished is never overwritten; a record of a run it lacks is kept on saving
    (fresh / "a-s0-0123456789" / "results.json").write_text(json.dumps({"student (x)": {"1-NN": 1.0}}))
    assert restore_progress(progress, fresh) == 0
    assert json.loads((fresh / "a-s0-0123456789" / "results.json").read_text())["student (x)"]["1-NN"] == 1.0
    other = tmp_path / "other_runs"
    _finished(other, "d-s1-ffffffffff", {"student (z)": {"1-NN": 60.0}})
    assert save_progress(other, progress) == 3
    assert restore_progress(tmp_path / "missing.json", fresh) == 0  # the first call creates the file


@pytest.mark.parametrize("text", ["not json", json.dumps({"format": 1, "runs": {"a": {"x": 1}}}),
                                  json.dumps({"format": 2, "runs": {}}), json.dumps([1, 2])])
def test_a_malformed_progress_file_is_a_config_error_naming_it(tmp_path, text):
    bad = tmp_path / "progress.json"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=r"^progress=.*progress.json: not a progress file"):
        restore_progress(bad, tmp_path / "runs")


def _preset(**over):
    from hydra import compose, initialize_config_dir

    from compress_lit.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="reproduce", overrides=["reproduce_preset=quick",
                                                           *[f"{k}={v}" for k, v in over.items()]])


def _fake_step(ran, fail_on=None):
    """A step that 'trains' by writing its results.json where reproduce looks for it."""
    def fake(module, args, runs, tag, dry, threads=None, log_file=False, run=True, teacher=""):
        done = rp_runs._find_done(runs, tag, rp_runs.step_key(module, args, teacher))
        if done.exists():
            return done.parent, json.loads(done.read_text())
        if tag == fail_on:
            raise rp_runs.StepFailed(f"step {tag} failed")
        ran.append(tag)
        res = {"student (x)": {"1-NN": float(len(ran))}}
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(res))
        return done.parent, res
    return fake


def test_a_reproduction_continues_on_another_machine_from_its_progress_file(tmp_path, monkeypatch):
    steps = [rp_runs.Step(f"s{i}", "compress_lit.train", [f"seed={i}"], True, method="compress_2q", teacher="aa" * 32)
             for i in range(3)]
    progress = tmp_path / "progress.json"
    cfg = _preset(progress=str(progress), jobs=1)
    first = []
    monkeypatch.setattr(rp_runs, "_run_step", _fake_step(first, fail_on="s2"))
    with pytest.raises(rp_runs.StepFailed):
        rp_runs.execute_recorded(cfg, steps, tmp_path / "machine1")
    assert first == ["s0", "s1"] and len(load_progress(progress)) == 2  # recorded although a step failed

    second = []  # a new machine: an empty runs/, only the progress file
    monkeypatch.setattr(rp_runs, "_run_step", _fake_step(second))
    res = rp_runs.execute_recorded(cfg, steps, tmp_path / "machine2")
    assert second == ["s2"]  # the recorded runs were not run again
    assert [r["student (x)"]["1-NN"] for r in res] == [1.0, 2.0, 1.0]
    assert len(load_progress(progress)) == 3

    # a rebuilt teacher with other weights: no record is any of its runs
    other = [rp_runs.Step(s.tag, s.module, s.args, True, method=s.method, teacher="bb" * 32) for s in steps]
    third = []
    monkeypatch.setattr(rp_runs, "_run_step", _fake_step(third))
    rp_runs.execute_recorded(cfg, other, tmp_path / "machine3")
    assert third == ["s0", "s1", "s2"]

    # without progress= nothing is read: a plain reproduction starts from its own runs/
    fourth = []
    monkeypatch.setattr(rp_runs, "_run_step", _fake_step(fourth))
    rp_runs.execute_recorded(_preset(jobs=1), steps, tmp_path / "machine4")
    assert fourth == ["s0", "s1", "s2"]
    assert len(list((tmp_path / "machine4").glob("*/results.json"))) == 3  # its own three, no restored records


def test_a_finished_step_records_its_seconds_and_command(tmp_path, monkeypatch):
    import types

    def fake_run(cmd, env=None, **kw):  # the step's process: writes its results.json into hydra.run.dir
        run_dir = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("hydra.run.dir=")))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps({"student (x)": {"1-NN": 50.0}}))
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(rp_runs.subprocess, "run", fake_run)
    run_dir, res = rp_runs._run_step("compress_lit.train", ["method=cc", "seed=1"], tmp_path, "t", dry=False, threads=1)
    step = json.loads((run_dir / "step.json").read_text())
    assert res == {"student (x)": {"1-NN": 50.0}} and step["threads"] == 1 and step["seconds"] >= 0
    assert step["command"] == "python -m compress_lit.train method=cc seed=1"
    save_progress(tmp_path, tmp_path / "p.json")
    assert load_progress(tmp_path / "p.json")[run_dir.name]["step.json"] == step


def test_record_part_records_the_finished_runs_and_writes_nothing_else(tmp_path):
    _finished(tmp_path / "runs", "x-s0-0000000000", {"student (x)": {"1-NN": 1.0}})
    cfg = _preset(out_dir=str(tmp_path), part="record", progress=str(tmp_path / "p.json"))
    assert rp.run_reproduce(cfg) == {"recorded": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "runs"]  # no teacher, no table
    with pytest.raises(ConfigError, match="part=record .* add progress=<file>"):
        rp.run_reproduce(_preset(out_dir=str(tmp_path), part="record"))


def test_a_supervised_step_keeps_its_classifier_accuracy_while_its_checkpoint_is_there(tmp_path, monkeypatch):
    import types

    import compress_lit.evaluation.classifier as clf

    def fake_run(cmd, env=None, **kw):
        run_dir = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("hydra.run.dir=")))
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
        (run_dir / "results.json").write_text("{}")
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(rp_runs.subprocess, "run", fake_run)
    monkeypatch.setattr(clf, "classifier_accuracy", lambda p: {"top1": 91.5, "checkpoint": str(p)})
    sup, _ = rp_runs._run_step("compress_lit.train", ["method=supervised"], tmp_path, "sup", dry=False)
    other, _ = rp_runs._run_step("compress_lit.train", ["method=cc"], tmp_path, "cc", dry=False)
    assert json.loads((sup / "classifier.json").read_text())["top1"] == 91.5
    assert not (other / "classifier.json").exists()
    save_progress(tmp_path, tmp_path / "p.json")
    assert load_progress(tmp_path / "p.json")[sup.name]["classifier.json"]["top1"] == 91.5
