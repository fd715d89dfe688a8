"""What the fault probes found, each case as the user meets it (docs/reliability.md, "Faults"): no code runs from a
checkpoint file; one run per run folder; a refused resume changes nothing; SIGTERM leaves a resumable checkpoint
and exit status 143; a non-finite step stops at that step and never becomes the last checkpoint; a full disk is
one line. The cache's identity cases are in test_teacher_cache.py."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compress_lit.runtime.safety import UnreadableFileError, UnsafeFileError, load_torch_file

ARGS = ["teacher.format=random", "teacher.checkpoint=null", "teacher.width_multiplier=0.25",
        "student.width_multiplier=0.125", "data.train_subset=1024", "data.val_subset=64", "data.batch_size=32",
        "method.queue_size=256", "eval.at_end=false", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "logger.flush_every_n_steps=1"]


# ---------------------------------------------------------------------------------------------- helpers
class Evil:
    """A pickle whose loading writes ``marker``: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def evil_file(path: Path, marker: Path, legacy: bool = False) -> Path:
    obj = {"state_dict": {"student.w": torch.zeros(2)}, "epoch": 0, "global_step": 0,
           "hyper_parameters": {"config": {}}, "payload": Evil(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _env(tmp_path):
    return dict(os.environ, COMPRESS_LIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")


def _cmd(entry, run_dir, *extra, base=ARGS):
    return [sys.executable, "-m", f"compress_lit.{entry}", *base, *extra, f"hydra.run.dir={run_dir}"]


def _run(tmp_path, entry, run_dir, *extra, base=ARGS, timeout=600):
    return subprocess.run(_cmd(entry, run_dir, *extra, base=base), cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc, *needles):
    """Exit status 1 and one line on stderr, no traceback, holding every needle."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    for n in needles:
        assert n in last, last
    return last


def _steps(run_dir):
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.exists():
        return []
    return [int(r["step"]) for r in csv.DictReader(open(path)) if r.get("train/loss_step")]


def _wait_for_step(proc, run_dir, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and max(_steps(run_dir) or [0]) < step:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the test could act"


# ----------------------------------------------------------------------------- 1. no code runs from a file
@pytest.mark.parametrize("legacy", [False, True])
def test_a_malicious_pickle_is_refused_before_any_of_it_runs(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = evil_file(tmp_path / "evil.ckpt", marker, legacy)
    for mmap in (False, True):
        with pytest.raises(UnsafeFileError, match=r"checkpoint=.*evil\.ckpt: refused: .*builtins\.exec|not listed"):
            load_torch_file(path, "checkpoint", mmap=mmap)
    assert not marker.exists()


def test_every_entry_point_refuses_a_malicious_checkpoint_in_one_line(tmp_path):
    """train resume=, evaluate / linear / export checkpoint=, train teacher.checkpoint= (compress_lit format):
    each ends in one line naming the key, and the file's code never runs."""
    marker = tmp_path / "pwned"
    evil = evil_file(tmp_path / "evil.ckpt", marker)
    cases = [("train", [f"resume={evil}"], "resume="),
             ("evaluate", [f"checkpoint={evil}"], "checkpoint="),
             ("linear", [f"checkpoint={evil}"], "checkpoint="),
             ("export", [f"checkpoint={evil}"], "checkpoint="),
             ("train", ["teacher.format=compress_lit", f"teacher.checkpoint={evil}", "teacher.arch=resnet18",
                        "teacher.pretrain_if_missing=false"], "teacher checkpoint")]
    for entry, extra, key in cases:
        base = ARGS if entry == "train" and "teacher.format=compress_lit" not in extra else \
            ([a for a in ARGS if not a.startswith("teacher.")] if entry == "train" else [])
        proc = _run(tmp_path, entry, tmp_path / "runs" / entry, *extra, base=base)
        _one_line_error(proc, "refused", key, str(evil))
        assert not marker.exists(), (entry, extra)


def test_every_teacher_format_refuses_a_malicious_file(tmp_path):
    from compress_lit.models import build_backbone
    from compress_lit.teachers import TeacherLoadError
    from compress_lit.teachers.formats import CHECKPOINT_FORMATS, FORMATS
    from compress_lit.teachers.loading import load_backbone_state

    marker = tmp_path / "pwned"
    evil = evil_file(tmp_path / "evil.pth", marker)
    models = {}
    assert len(CHECKPOINT_FORMATS) >= 8
    for fmt in CHECKPOINT_FORMATS:
        arch = (FORMATS[fmt].archs or ("resnet18",))[0]  # an architecture the format was released in
        if arch not in models:
            models[arch] = build_backbone(arch, small_input=True)
        with pytest.raises(TeacherLoadError, match=rf"'{fmt}'\): refused"):
            load_backbone_state(str(evil), fmt, models[arch])
    from omegaconf import OmegaConf

    from compress_lit.teachers.timm_teacher import build_timm_backbone

    with pytest.raises(TeacherLoadError, match=r"'timm'\): refused"):  # teacher=timm with a local file
        build_timm_backbone(OmegaConf.create({"name": "resnet18.a1_in1k", "checkpoint": str(evil),
                                              "embedding": None}))
    assert not marker.exists()


def test_the_library_readers_refuse_a_malicious_file(tmp_path):
    """The readers behind detect, the supervised classifier, report and reproduce's teacher check."""
    from compress_lit.evaluation.classifier import classifier_accuracy
    from compress_lit.evaluation.loading import load_model
    from compress_lit.report import write_report
    from compress_lit.reproduction.teacher import release_teacher, weights_sha256

    marker = tmp_path / "pwned"
    evil = evil_file(tmp_path / "evil.ckpt", marker)
    for call in (lambda: load_model(str(evil)), lambda: classifier_accuracy(evil),  # evaluate, linear, detect
                 lambda: weights_sha256(evil), lambda: release_teacher(evil)):
        with pytest.raises(UnsafeFileError):
            call()
    run = tmp_path / "run"  # report reads a run folder's results, never its checkpoints
    (run / "checkpoints").mkdir(parents=True)
    evil_file(run / "checkpoints" / "last.ckpt", marker)
    (run / "results.json").write_text(json.dumps({"student (compress_2q)": {"1-NN": 50.0}}))
    write_report([run], out=tmp_path / "report.md")
    assert not marker.exists()


def test_our_checkpoints_and_the_committed_teacher_load_weights_only(tmp_path):
    """No allowlist needed for what this version writes: the RNG states are plain containers."""
    proc = _run(tmp_path, "train", tmp_path / "run", "optim.epochs=1", "data.train_subset=128")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert isinstance(ckpt["rng_states"]["numpy"][1], torch.Tensor) and ckpt["global_step"] == 4
    committed = Path(__file__).resolve().parents[1] / "results" / "teacher" / "full_teacher.ckpt"
    assert torch.load(committed, weights_only=True)["state_dict"]


def test_an_older_checkpoints_numpy_rng_state_still_restores(tmp_path):
    import numpy as np

    from compress_lit.runtime.resume import restore_rng_states

    np.random.seed(5)
    state = np.random.get_state()  # a uint32 array: what checkpoints before this version stored
    want = np.random.rand(3)
    torch.save({"rng_states": {"torch": torch.get_rng_state(), "numpy": state, "python": (3, tuple(range(625)),
                                                                                          None)}}, tmp_path / "o.ckpt")
    loaded = load_torch_file(tmp_path / "o.ckpt", "resume")
    import random
    before = random.getstate()
    restore_rng_states(loaded["rng_states"])
    random.setstate(before)
    assert np.array_equal(np.random.rand(3), want)


def test_a_truncated_or_foreign_resume_file_is_one_line(tmp_path):
    good = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0}, good)
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    proc = _run(tmp_path, "train", tmp_path / "runs" / "t", f"resume={trunc}")
    _one_line_error(proc, f"resume={trunc}", "not a readable checkpoint")
    foreign = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, foreign)
    from compress_lit.runtime.resume import read_resume_checkpoint

    with pytest.raises(UnreadableFileError, match="not a Lightning checkpoint"):
        read_resume_checkpoint(foreign)


# --------------------------------------------------------------------------- 3. one run per run folder
def test_a_second_run_into_a_busy_folder_is_refused_and_the_first_is_untouched(tmp_path):
    run_dir = tmp_path / "runs" / "shared"
    # a long first run (stopped by SIGTERM once the second was refused), so it is running whatever the load
    first = subprocess.Popen(_cmd("train", run_dir, "optim.epochs=200", "seed=0"), cwd=tmp_path,
                             env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_step(first, run_dir, 4)
    second = _run(tmp_path, "train", run_dir, "optim.epochs=200", "seed=1")
    line = _one_line_error(second, "RunFolderInUse", str(run_dir), "in use by another run", f"pid {first.pid}")
    assert first.poll() is None
    assert "seed: 0" in (run_dir / ".hydra" / "config.yaml").read_text()  # the first run's config, put back
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=300) == 143
    steps = _steps(run_dir)
    assert steps == sorted(set(steps)) and len(steps) >= 5  # one run's history: every step once
    assert line in (run_dir / "train.log").read_text()  # the refusal is in the folder's log, nothing else changed

    # sequentially too: a folder holding a run (here its SIGTERM checkpoint) is not a new run's
    third = _run(tmp_path, "train", run_dir, "optim.epochs=200", "seed=2")
    _one_line_error(third, "already holds a run", "resume=auto")
    assert "seed: 0" in (run_dir / ".hydra" / "config.yaml").read_text()


def test_resume_auto_with_another_config_or_teacher_changes_nothing(tmp_path):
    from compress_lit.models import build_backbone

    teacher = tmp_path / "teacher.pth"
    torch.manual_seed(0)
    torch.save(build_backbone("resnet18", small_input=True, width_multiplier=0.25).state_dict(), teacher)
    base = [a for a in ARGS if not a.startswith("teacher.")] + [
        "teacher.format=torchvision", f"teacher.checkpoint={teacher}", "teacher.arch=resnet18",
        "teacher.small_input=true", "teacher.width_multiplier=0.25", "teacher.pretrain_if_missing=false",
        "data.train_subset=256"]
    run_dir = tmp_path / "runs" / "r"
    assert _run(tmp_path, "train", run_dir, "optim.epochs=2", base=base).returncode == 0
    files = [run_dir / ".hydra" / "config.yaml", run_dir / "csv" / "metrics.csv", run_dir / "csv" / "hparams.yaml",
             run_dir / "checkpoints" / "last.ckpt"]
    before = [f.read_bytes() for f in files]

    other_config = _run(tmp_path, "train", run_dir, "optim.epochs=3", "resume=auto", base=base)
    _one_line_error(other_config, "resume=auto", "another config", "optim.epochs (2 there, 3 now)")
    assert [f.read_bytes() for f in files] == before

    torch.manual_seed(1)  # another teacher in the same file: same config, other weights
    torch.save(build_backbone("resnet18", small_input=True, width_multiplier=0.25).state_dict(), teacher)
    other_teacher = _run(tmp_path, "train", run_dir, "optim.epochs=2", "resume=auto", base=base)
    _one_line_error(other_teacher, "another teacher", "nothing was changed")
    assert [f.read_bytes() for f in files] == before


def test_a_dangling_or_missing_last_ckpt_resumes_from_the_epoch_checkpoint(tmp_path):
    from compress_lit.runtime.resume import own_checkpoint

    run_dir = tmp_path / "runs" / "d"
    assert _run(tmp_path, "train", run_dir, "optim.epochs=1", "data.train_subset=128").returncode == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    epoch_ckpt = last.resolve()
    assert own_checkpoint(run_dir) == last
    last.unlink()
    last.symlink_to("epoch0-step999.ckpt")  # dangling: a write killed between the checkpoint and the link
    assert own_checkpoint(run_dir) == epoch_ckpt
    proc = _run(tmp_path, "train", run_dir, "optim.epochs=2", "data.train_subset=128", "resume=auto")
    _one_line_error(proc, "another config")  # the epoch checkpoint was found and read; its config is checked
    proc = _run(tmp_path, "train", run_dir, "optim.epochs=1", "data.train_subset=128", "resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {epoch_ckpt}" in proc.stdout + proc.stderr
    last.unlink(missing_ok=True)  # missing altogether
    assert own_checkpoint(run_dir).parent == run_dir / "checkpoints"


def test_claiming_a_folder_removes_the_orphans_of_a_killed_write(tmp_path):
    from compress_lit.runtime import run_folder

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    orphan = run_dir / "checkpoints" / ".epoch3-step40.ckpt.tmp4242"
    orphan.write_bytes(b"half")
    kept = run_dir / "checkpoints" / "epoch2-step30.ckpt"
    kept.write_bytes(b"whole")
    try:
        run_folder.claim(run_dir, resuming=True)
        assert not orphan.exists() and kept.exists()
    finally:
        run_folder.release_all()


# --------------------------------------------------------------------------------------- 4. SIGTERM
def test_sigterm_saves_a_resumable_checkpoint_and_exits_143(tmp_path):
    run_dir = tmp_path / "runs" / "s"
    proc = subprocess.Popen(_cmd("train", run_dir, "optim.epochs=3"), cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, run_dir, 40)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    saved = run_dir / "hpc_ckpt_1.ckpt"
    step = torch.load(saved, weights_only=True)["global_step"]
    assert 40 <= step < 96
    assert f"SIGTERM at global step {step}" in out and f"saved {saved}" in out
    assert f"SIGTERM at global step {step}" in (run_dir / "train.log").read_text()
    resumed = _run(tmp_path, "train", run_dir, "optim.epochs=3", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {saved}" in resumed.stdout + resumed.stderr
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 96 and final["epoch"] == 2


# ------------------------------------------------------------------------------------ 5. non-finite
def test_a_huge_learning_rate_stops_at_the_step_in_one_line_and_keeps_no_poisoned_checkpoint(tmp_path):
    run_dir = tmp_path / "runs" / "nan"
    proc = _run(tmp_path, "train", run_dir, "optim.epochs=2", "optim.lr=1e6", "data.train_subset=256")
    line = _one_line_error(proc, "NonFiniteError", "non-finite", "at global step")
    assert line in (run_dir / "train.log").read_text()
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt") if (run_dir / "checkpoints").exists() else ():
        sd = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()), ckpt


def test_a_checkpoint_holding_inf_is_never_written(tmp_path):
    from compress_lit.runtime.nonfinite import NonFiniteError, WeightWatch

    class T:
        global_step, current_epoch = 7, 1

    state = {"student.bn1.running_var": torch.tensor([1.0, float("inf")]), "student.w": torch.ones(2),
             "queues.ptr": torch.tensor(3)}
    with pytest.raises(NonFiniteError, match=r"global step 7 \(epoch 1\): student\.bn1\.running_var; the "
                                             r"checkpoint was not written"):
        WeightWatch().on_save_checkpoint(T(), None, {"state_dict": state})
    WeightWatch().on_save_checkpoint(T(), None, {"state_dict": {"student.w": torch.ones(2)}})  # finite: no error


def test_the_step_watch_names_the_poisoned_buffer():
    from compress_lit.runtime.nonfinite import NonFiniteError, WeightWatch

    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))

    class T:
        global_step, current_epoch = 12, 0

    watch = WeightWatch()
    watch.on_train_start(T(), module)
    watch.on_train_batch_end(T(), module, None, None, 3)  # finite: nothing
    module[1].running_var.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"global step 12 \(epoch 0, batch 4\) \(1\.running_var\)"):
        watch.on_train_batch_end(T(), module, None, None, 4)


# ---------------------------------------------------------------------------------------- 6. disk full
def test_disk_full_during_a_checkpoint_write_is_one_line_with_the_free_space(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from compress_lit.runtime.safety import AtomicCheckpointIO, DiskFullError

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, path)
    good = path.read_bytes()

    def full(obj, f, *a, **k):  # what torch's zip writer raises when the disk fills
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**30, 2**30 - 2**20, 2**20))
    with pytest.raises(DiskFullError, match=rf"disk full while writing the checkpoint {path} \(0\.00 GiB free"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, path)
    monkeypatch.undo()
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
