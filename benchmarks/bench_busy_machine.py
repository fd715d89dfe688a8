"""Benchmark: the demo's training on a busy machine, with torch threads chosen for the free cores.

The same short command (the demo teacher's MoCo v2 pretraining, ``pretrain_experiment=demo_teacher``, for
``--epochs`` epochs, no evaluation) runs three times: on the quiet machine (threads chosen automatically: all the
cores), with one competing busy process (a pure-Python spin loop) and threads chosen automatically
(``runtime/threads.py``: the free cores), and with the same competitor but torch forced to use every core
(``COMPRESS_LIT_THREADS=<cores>``: what happened before the automatic choice). Reported: seconds and the slowdown
against the quiet run. The issue's target: with one competitor, at most 2x the quiet time.

Run it alone (other processes would be competitors too). Usage: ``PYTHONPATH=src python
benchmarks/bench_busy_machine.py [--epochs N]``; writes ``benchmarks/results/busy_machine.json``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, save_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(epochs: int, workdir: Path, name: str, **env) -> float:
    cmd = [sys.executable, "-m", "compress_lit.pretrain", "pretrain_experiment=demo_teacher",
           f"optim.epochs={epochs}", "eval.at_end=false", "trainer.enable_progress_bar=false",
           "trainer.enable_model_summary=false", "logger=none", f"hydra.run.dir={workdir / name.replace(' ', '_').replace(',', '')}"]
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "COMPRESS_LIT_THREADS")}
    e.update(PYTHONPATH=str(ROOT / "src"), **env)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=e, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the command failed:\n{proc.stderr[-2000:]}")
    chosen = [ln.split(" - ", 1)[-1] for ln in (proc.stdout + proc.stderr).splitlines() if "cores are busy" in ln]
    print(f"{name:<34} {seconds:7.1f} s  {chosen[0] if chosen else 'all cores'}", flush=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    env = {"cpu": cpu_model(), "cores": cores, "loadavg_start": os.getloadavg()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        quiet = run(args.epochs, work, "quiet")
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1.0)
            busy_auto = run(args.epochs, work, "one busy neighbour, auto threads")
            busy_all = run(args.epochs, work, f"one busy neighbour, {cores} threads", COMPRESS_LIT_THREADS=str(cores))
        finally:
            spinner.kill()
    result = {"environment": env, "epochs": args.epochs, "quiet_s": round(quiet, 1),
              "busy_auto_s": round(busy_auto, 1), "busy_all_cores_s": round(busy_all, 1),
              "slowdown_auto": round(busy_auto / quiet, 2), "slowdown_all_cores": round(busy_all / quiet, 2),
              "wall_s": time.perf_counter() - t0}
    print(f"\nslowdown with one busy neighbour: {result['slowdown_auto']}x with the threads chosen for the free "
          f"cores, {result['slowdown_all_cores']}x with all {cores} cores (target: <= 2x)")
    save_result(result, ROOT / "benchmarks" / "results" / "busy_machine.json")


if __name__ == "__main__":
    main()
