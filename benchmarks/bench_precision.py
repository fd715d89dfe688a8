"""fp32 against bf16 autocast for the table's students on this CPU: what ``trainer.precision=auto`` decides.

For each student of the Fashion-MNIST table (``conf/student/alexnet_small.yaml``, ``resnet18_small.yaml``) at
28 px, batch 64, one thread: images/s of the forward pass (eval mode, no grad) and of a training step (train mode,
forward + backward of a mean-square loss on the embedding), in fp32 and under bf16 autocast; fastest of ``--reps``
timed repetitions after one warm-up. Also the CPU (``lscpu``'s model name, torch's CPU capability, the native bf16
features) and what ``auto`` resolves to on it (``compress_lit.runtime.precision``).

Then the same again in a subprocess with oneDNN and ATen capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2``): the kernels an AVX2-only CPU runs, where bf16 is emulated (``--no-avx2`` skips it).
That is an emulation on this CPU, not a measurement of another one.

Usage: ``PYTHONPATH=src python benchmarks/bench_precision.py [--reps 3] [--no-avx2]``; writes
``benchmarks/results/precision.json``. Under a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, save_result  # noqa: E402

from compress_lit.models import build_from_config  # noqa: E402
from compress_lit.runtime.precision import choose_precision, cpu_info  # noqa: E402

STUDENTS = ("alexnet_small", "resnet18_small")
CONF = Path(__file__).resolve().parents[1] / "conf" / "student"
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def images_per_second(model: torch.nn.Module, x: torch.Tensor, train: bool, bf16: bool, reps: int) -> float:
    model.train(train)
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        with torch.set_grad_enabled(train), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            loss = out.float().pow(2).mean()
        if train:
            model.zero_grad(set_to_none=True)
            loss.backward()
        if i:  # the first is the warm-up
            times.append(time.perf_counter() - t0)
    return x.shape[0] / min(times)


def measure(reps: int, batch: int, size: int) -> dict:
    """Every student, forward and training step, fp32 and bf16, on this process's CPU settings."""
    cpu = cpu_info()
    out = {"cpu": cpu.describe(), "capability": cpu.capability, "native_bf16": cpu.native_bf16,
           "auto": choose_precision("auto", device="cpu").precision, "students": {}}
    for name in STUDENTS:
        torch.manual_seed(0)
        model = build_from_config(OmegaConf.load(CONF / f"{name}.yaml"))
        x = torch.randn(batch, 3, size, size)
        row = {}
        for what, train in (("forward", False), ("train_step", True)):
            fp32 = images_per_second(model, x, train, False, reps)
            bf16 = images_per_second(model, x, train, True, reps)
            row[what] = {"fp32": fp32, "bf16": bf16, "bf16_slowdown": fp32 / bf16}
        out["students"][name] = row
    return out


def print_rows(title: str, res: dict) -> None:
    print(f"\n{title}\n  {res['cpu']}\n  trainer.precision=auto -> {res['auto']}")
    print(f"  {'student':16s} {'pass':11s} {'fp32 img/s':>11s} {'bf16 img/s':>11s} {'bf16 time / fp32':>17s}")
    for name, row in res["students"].items():
        for what, r in row.items():
            print(f"  {name:16s} {what:11s} {r['fp32']:11.0f} {r['bf16']:11.1f} {r['bf16_slowdown']:16.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--no-avx2", action="store_true", help="skip the run with oneDNN and ATen capped at AVX2")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the capped run: print JSON only
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "precision.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(measure(args.reps, args.batch, args.size)))
        return
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "cpu": cpu_model(), "loadavg_start": os.getloadavg()}
    t0 = time.time()
    result = {"environment": env, "batch": args.batch, "size": args.size, "reps": args.reps,
              "this_cpu": measure(args.reps, args.batch, args.size)}
    print_rows(f"This CPU, one thread, batch {args.batch} at {args.size} px:", result["this_cpu"])
    if not args.no_avx2:
        cmd = [sys.executable, __file__, "--child", "--reps", str(args.reps), "--batch", str(args.batch),
               "--size", str(args.size)]
        done = subprocess.run(cmd, env={**os.environ, **AVX2_ENV, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, check=True)
        result["avx2_emulated"] = json.loads(done.stdout.strip().splitlines()[-1])
        print_rows("The same CPU with oneDNN and ATen capped at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 "
                   "ATEN_CPU_CAPABILITY=avx2), as on an AVX2-only CPU:", result["avx2_emulated"])
    result["wall_s"] = time.time() - t0
    save_result(result, args.out)


if __name__ == "__main__":
    main()
