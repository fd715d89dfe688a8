"""Benchmark of a full CompReSS-2q training step: the LightningModule under a Trainer vs a plain PyTorch loop.

1. **Lightning overhead.** The demo's sizes (teacher ResNet-18 small-input width 0.5, student ResNet-18
   small-input width 0.25, momentum student, 16 px, batch 128, queue 1,024, SGD with the demo's schedule) on
   fixed in-memory batches. ``compress_lit.methods.CompReSS`` is driven by a ``pytorch_lightning.Trainer`` on
   CPU (no logger, no checkpointing, no progress bar, no model summary); the plain loop does the same
   computation with the same modules and the same optimiser: teacher forward under inference mode, student
   forward, momentum-student forward under no-grad, ``compress_loss``, stage keys, backward, SGD step, queue
   flush, EMA update. Each step is the interval between consecutive step ends (for Lightning, a callback's
   ``on_train_batch_end``), so everything the Trainer does between steps counts; the first steps of every run
   are warm-up and not counted. Plain and Lightning runs alternate over several rounds (which goes first
   alternates too), each run starting from the same weights. Reported: median step time, steps/s, and
   Lightning's overhead in %: from the median steps, from the mean steps (which include occasional slow steps),
   and the median over rounds of each round's own ratio (the most robust to a machine whose load changes).
2. **Student throughput.** Images/s of forward + backward at batch 128 for each small student (alexnet_small:
   AlexNet small-input width 0.25 fc 1,024; resnet18_small: width 0.25; mobilenetv2_small: width 0.5) at 16 and
   28 px, and its peak RSS. Every configuration runs in a fresh subprocess, so its peak RSS (VmHWM) is its own:
   reported as the process's peak and as the growth over the process's RSS before the model was built.

Runs on one CPU thread by default (``--threads``): on a shared machine, multi-threaded timings of these small
networks swing by up to 30x whenever another process takes a core (OpenMP threads wait at every op's barrier for
the descheduled one); one thread is only time-sliced, and the alternating rounds share that evenly.

Usage: ``PYTHONPATH=src python benchmarks/bench_train_step.py [--steps N] [--rounds R] [--threads T] [--quick]``;
prints the tables, writes ``benchmarks/results/train_step.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("PYTORCH_LIGHTNING_DISABLE_TIPS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, save_result  # noqa: E402

from compress_lit.runtime.config import OptimConfig  # noqa: E402
from compress_lit.losses.compress import compress_loss  # noqa: E402
from compress_lit.methods import CompReSS  # noqa: E402
from compress_lit.models import build_backbone  # noqa: E402
from compress_lit.methods.momentum import ema_update  # noqa: E402
from compress_lit.methods.schedule import build_optimizer  # noqa: E402
from compress_lit.teachers import FrozenTeacher  # noqa: E402

STUDENTS = {
    "alexnet_small": dict(arch="alexnet", small_input=True, width_multiplier=0.25, fc_dim=1024),
    "resnet18_small": dict(arch="resnet18", small_input=True, width_multiplier=0.25),
    "mobilenetv2_small": dict(arch="mobilenetv2", small_input=True, width_multiplier=0.5),
}




def environment() -> dict:
    import pytorch_lightning as pl

    return {"python": platform.python_version(), "torch": torch.__version__, "pytorch_lightning": pl.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": cpu_model(),
            "machine": platform.machine(), "loadavg_start": os.getloadavg()}


def _status_kb(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------------------
# 1. Lightning vs plain PyTorch
# ------------------------------------------------------------------------------------------------------------
def demo_module(queue_size: int, seed: int = 0) -> CompReSS:
    torch.manual_seed(seed)
    teacher = FrozenTeacher(build_backbone("resnet18", small_input=True, width_multiplier=0.5))
    student = build_backbone("resnet18", small_input=True, width_multiplier=0.25)
    # the digits demo's optimiser: SGD lr 0.05, momentum 0.9, wd 1e-4, cosine over 30 epochs
    optim = OptimConfig(lr=0.05, epochs=30, scheduler="cosine", milestones=[])
    return CompReSS(student, teacher, optim, queue_size=queue_size)


def fixed_batches(n: int, batch: int, px: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, px, px, generator=g), torch.zeros(batch, dtype=torch.long),
             torch.arange(i * batch, (i + 1) * batch)) for i in range(n)]


def step_intervals(stamps: list[float], warmup: int) -> list[float]:
    """Intervals between consecutive step ends, after ``warmup`` steps."""
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]


def run_plain(module: CompReSS, batches: list, steps: int) -> list[float]:
    """The same computation as ``CompReSS.training_step`` + its hooks, written as a minimal loop."""
    module.train()
    teacher, student, momentum_student, q = module.teacher, module.student, module.student_momentum, module.queues
    opt = build_optimizer(module.parameter_groups(), module.optim_cfg)["optimizer"]
    stamps = [time.perf_counter()]
    for i in range(steps):
        x, _, _ = batches[i % len(batches)]
        with torch.inference_mode():
            t = teacher(x).float()
        t = t.clone()
        s = student(x)
        loss = compress_loss(s, t, q.bank("student"), q.bank("teacher"), module.temperature)
        with torch.no_grad():
            keys = momentum_student(x)
        q.stage(teacher=F.normalize(t.float(), dim=1), student=F.normalize(keys.float(), dim=1))
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        q.flush()
        ema_update(momentum_student, student, module.momentum)
        stamps.append(time.perf_counter())
    return stamps


def run_lightning(module: CompReSS, batches: list, steps: int) -> tuple[list[float], float]:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, Dataset

    class Batches(Dataset):  # pre-built batches, handed out as they are
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    class Stamps(pl.Callback):
        def __init__(self):
            self.t = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not self.t:
                self.t.append(time.perf_counter())  # the first step's start

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.t.append(time.perf_counter())

    stamps = Stamps()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[stamps], deterministic=False)
    loader = DataLoader(Batches(), batch_size=None, shuffle=False, num_workers=0)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    assert len(stamps.t) == steps + 1, (len(stamps.t), steps)
    return stamps.t, stamps.t[0] - t0


def bench_lightning_overhead(steps: int, warmup: int, rounds: int, batch: int, px: int, queue: int,
                             budget_s: float = float("inf")) -> dict:
    template = demo_module(queue)
    batches = fixed_batches(8, batch, px)
    intervals = {"plain": [], "lightning": []}
    setups, paired = [], []  # paired: the overhead within each round (plain and Lightning back to back)
    t0 = time.perf_counter()
    done = 0
    for _ in range(rounds):
        if done and time.perf_counter() - t0 > budget_s:  # a busy machine: keep the time budget
            break
        done += 1
        first_plain = done % 2 == 1  # alternate which loop goes first in a round
        if first_plain:
            plain = step_intervals(run_plain(copy.deepcopy(template), batches, warmup + steps), warmup)
        stamps, setup = run_lightning(copy.deepcopy(template), batches, warmup + steps)
        light = step_intervals(stamps, warmup)
        if not first_plain:
            plain = step_intervals(run_plain(copy.deepcopy(template), batches, warmup + steps), warmup)
        intervals["plain"] += plain
        intervals["lightning"] += light
        setups.append(setup)
        paired.append(100 * (statistics.median(light) / statistics.median(plain) - 1))
    out = {"batch": batch, "px": px, "queue": queue, "steps_per_run": steps, "warmup_steps": warmup,
           "rounds": done, "rounds_requested": rounds, "lightning_fit_setup_s": setups}
    for k, v in intervals.items():
        out[k] = {"step_s_median": statistics.median(v), "step_s_mean": statistics.fmean(v),
                  "steps_per_s": 1.0 / statistics.median(v), "images_per_s": batch / statistics.median(v),
                  "intervals_s": v}
    out["overhead_pct_median"] = 100 * (out["lightning"]["step_s_median"] / out["plain"]["step_s_median"] - 1)
    out["overhead_pct_mean"] = 100 * (out["lightning"]["step_s_mean"] / out["plain"]["step_s_mean"] - 1)
    out["overhead_pct_per_round"] = paired
    out["overhead_pct_paired_median"] = statistics.median(paired)
    q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    out["overhead_pct_paired_iqr"] = [q[0], q[2]]
    return out


# ------------------------------------------------------------------------------------------------------------
# 2. student throughput (each configuration in its own process)
# ------------------------------------------------------------------------------------------------------------
def student_worker(name: str, px: int, batch: int, steps: int, warmup: int) -> dict:
    rss0 = _status_kb("VmRSS")
    spec = dict(STUDENTS[name])
    torch.manual_seed(0)
    model = build_backbone(spec.pop("arch"), **spec).train()
    x = torch.randn(batch, 3, px, px)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        emb = model(x)
        emb.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    hwm = _status_kb("VmHWM")
    med = statistics.median(times)
    return {"student": name, "px": px, "batch": batch, "embed_dim": int(model.embed_dim),
            "params": sum(p.numel() for p in model.parameters()), "step_s_median": med,
            "images_per_s": batch / med, "peak_rss_bytes": hwm * 1024 if hwm else None,
            "peak_rss_growth_bytes": (hwm - rss0) * 1024 if hwm and rss0 else None, "timed_steps": steps}


def bench_students(sizes, batch: int, steps: int, warmup: int) -> list[dict]:
    rows = []
    for name in STUDENTS:
        for px in sizes:
            cmd = [sys.executable, __file__, "--student-worker", name, str(px), "--batch", str(batch),
                   "--student-steps", str(steps), "--student-warmup", str(warmup),
                   "--threads", str(torch.get_num_threads())]
            p = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return rows


# ------------------------------------------------------------------------------------------------------------
def _mb(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8, help="plain / Lightning run pairs, alternating")
    ap.add_argument("--budget-s", type=float, default=120.0,
                    help="start no further round after this many seconds (a busy machine)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--queue", type=int, default=1024)
    ap.add_argument("--student-steps", type=int, default=6)
    ap.add_argument("--student-warmup", type=int, default=2)
    ap.add_argument("--student-worker", nargs=2, metavar=("NAME", "PX"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="few steps (smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train_step.json"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared machine, other processes make multi-threaded "
                         "timings of these small convolutions swing up to 30x through contended OpenMP barriers; "
                         "0 = torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.student_worker:
        name, px = a.student_worker
        print(json.dumps(student_worker(name, int(px), a.batch, a.student_steps, a.student_warmup)))
        return {}
    if a.quick:
        a.steps, a.warmup, a.rounds, a.student_steps, a.student_warmup = 4, 1, 1, 2, 1

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    t_start = time.perf_counter()
    env = environment()
    lo = bench_lightning_overhead(a.steps, a.warmup, a.rounds, a.batch, 16, a.queue, a.budget_s)
    print(f"\nCompReSS-2q training step, demo sizes (teacher R18 x0.5, student R18 x0.25, 16 px, batch {a.batch}, "
          f"queue {a.queue}), CPU {torch.get_num_threads()} threads; {lo['rounds']} rounds x {a.steps} steps each")
    print(f"  {'loop':<12}{'median step ms':>16}{'mean step ms':>14}{'steps/s':>10}{'images/s':>10}")
    for k in ("plain", "lightning"):
        r = lo[k]
        print(f"  {k:<12}{1e3 * r['step_s_median']:>16.1f}{1e3 * r['step_s_mean']:>14.1f}"
              f"{r['steps_per_s']:>10.2f}{r['images_per_s']:>10.0f}")
    print(f"  Lightning overhead: {lo['overhead_pct_median']:+.1f}% (median step), {lo['overhead_pct_mean']:+.1f}% "
          f"(mean step), {lo['overhead_pct_paired_median']:+.1f}% (median over rounds of the within-round ratio, "
          f"quartiles {lo['overhead_pct_paired_iqr'][0]:+.1f}% / {lo['overhead_pct_paired_iqr'][1]:+.1f}%); "
          f"target <= 5%.\n  Trainer.fit setup before the first step: "
          f"{statistics.median(lo['lightning_fit_setup_s']):.2f} s")

    students = bench_students((16, 28), a.batch, a.student_steps, a.student_warmup)
    print(f"\nstudent forward + backward, batch {a.batch}, CPU; one fresh process per row")
    print(f"  {'student':<20}{'px':>4}{'emb':>6}{'params':>10}{'ms/step':>10}{'images/s':>10}"
          f"{'peak RSS MB':>13}{'growth MB':>11}")
    for r in students:
        print(f"  {r['student']:<20}{r['px']:>4}{r['embed_dim']:>6}{r['params']:>10,}{1e3 * r['step_s_median']:>10.1f}"
              f"{r['images_per_s']:>10.0f}{_mb(r['peak_rss_bytes']):>13}{_mb(r['peak_rss_growth_bytes']):>11}")
    env["loadavg_end"] = os.getloadavg()
    result = {"environment": env, "lightning_overhead": lo, "students": students, "quick": a.quick,
              "wall_s": time.perf_counter() - t_start}
    save_result(result, a.out)
    return result


if __name__ == "__main__":
    main()
