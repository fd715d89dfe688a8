"""Exact resume: a run killed with SIGKILL mid-epoch and resumed with resume=auto continues exactly as the
uninterrupted run (same later losses, same final weights, queues and momentum student), in the killed run's own
directory (one metrics.csv with every step once, one log)."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ARGS = ["teacher.format=random", "teacher.checkpoint=null", "teacher.width_multiplier=0.25",
        "student.width_multiplier=0.125", "data.train_subset=1024", "data.val_subset=64", "data.batch_size=32",
        "method.queue_size=256", "optim.epochs=3", "eval.at_end=false", "trainer.deterministic=true",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
        "logger.flush_every_n_steps=1"]


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "compress_lit.train", *ARGS, *extra, f"hydra.run.dir={run_dir}"]


def _env(tmp_path):
    return dict(os.environ, COMPRESS_LIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")


def _epoch_losses(run_dir):
    rows = list(csv.DictReader(open(Path(run_dir) / "csv" / "metrics.csv")))
    return {int(r["epoch"]): float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")}


def _step_losses(run_dir):
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.exists():
        return {}
    rows = list(csv.DictReader(open(path)))
    return {int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")}


def test_sigkill_mid_epoch_then_resume_auto_equals_uninterrupted_run(tmp_path):
    env = _env(tmp_path)
    ref_dir, killed_dir, resumed_dir = (tmp_path / "runs" / "x" / n for n in ("ref", "killed", "resumed"))
    ref = subprocess.run(_cmd(ref_dir), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    # the same run, killed with SIGKILL part-way through epoch 1 (after the epoch-0 checkpoint was written)
    proc = subprocess.Popen(_cmd(killed_dir), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = killed_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and max(_step_losses(killed_dir) or {0: 0}) >= 40:  # 32 steps/epoch: in epoch 1
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # normally only epoch 0 had been saved; on a busy machine this poll may come late, after epoch 1's checkpoint
    saved_epoch = torch.load(ckpt, weights_only=True)["epoch"]
    assert saved_epoch in (0, 1)

    logged_before = max(_step_losses(killed_dir))
    assert logged_before >= 32 * (saved_epoch + 1)  # steps after the checkpoint were logged, and will be run again

    resumed = subprocess.run(_cmd(resumed_dir, "resume=auto"), cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout + resumed.stderr
    assert "resume=auto: resuming from" in out and str(ckpt) in out
    assert "dirpath" not in out  # Lightning's "checkpoint directory changed" warning: same directory
    assert "exists and is not empty" not in out  # nor its warning about the run's own checkpoints

    # the resumed run continued in the killed run's directory; the one Hydra made for it is gone
    assert not resumed_dir.exists()
    assert "resume=auto: continuing the run in" in (killed_dir / "train.log").read_text()
    assert (killed_dir / "learning_curves.png").is_file()
    ref_losses, res_losses = _epoch_losses(ref_dir), _epoch_losses(killed_dir)
    assert set(res_losses) == {0, 1, 2}  # the whole run's history: epoch 0 from before the kill, 1 and 2 re-run
    for e in (0, 1, 2):
        assert res_losses[e] == ref_losses[e], (e, res_losses[e], ref_losses[e])
    rows = list(csv.DictReader(open(killed_dir / "csv" / "metrics.csv")))
    steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert steps == sorted(set(steps)) == list(range(96))  # every step once: the killed run's later rows dropped
    assert _step_losses(killed_dir) == _step_losses(ref_dir)
    a = torch.load(ref_dir / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 96
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_slurm_requeue_signal_saves_requeues_and_the_requeued_job_continues(tmp_path):
    """SLURM preemption through Lightning's SLURM environment: SIGUSR1 saves ``hpc_ckpt_1.ckpt`` into the run dir
    and calls ``scontrol requeue <job id>`` (a stand-in ``scontrol`` records it); SLURM then kills the job; the
    requeued job (the same command in the same run dir, ``resume=auto``) continues from that checkpoint."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    scontrol = bindir / "scontrol"
    # the stand-in records the call and stops the job there (as SLURM ends it soon after): whatever the load on the
    # machine, the job cannot run on to the epoch's checkpoint, which would then be newer than hpc_ckpt_1.ckpt
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nkill -STOP $PPID\n")
    scontrol.chmod(0o755)
    env = dict(_env(tmp_path), PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", SLURM_NTASKS="1",
               SLURM_JOB_NAME="compress", SLURM_JOB_ID="4242", SLURM_PROCID="0", SLURM_LOCALID="0",
               SLURM_NODEID="0", SLURM_NODELIST="localhost")
    run_dir = tmp_path / "runs" / "x" / "job"
    proc = subprocess.Popen(_cmd(run_dir, "resume=auto"), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and max(_step_losses(run_dir) or {0: 0}) < 40:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal"
    os.kill(proc.pid, signal.SIGUSR1)  # what SLURM sends before a preemption / time limit (--signal=SIGUSR1@90)
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    while time.time() < deadline and not (calls.exists() and hpc.exists()):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # SLURM ends the job
    proc.wait()
    assert calls.read_text().split() == ["requeue", "4242"]
    saved = torch.load(hpc, weights_only=False)
    assert 40 <= saved["global_step"] < 96 and "queues.ptr" in saved["state_dict"]

    requeued = subprocess.run(_cmd(run_dir, "resume=auto"), cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    out = requeued.stdout + requeued.stderr
    assert f"resume=auto: resuming from {hpc}" in out
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 96 and final["epoch"] == 2
