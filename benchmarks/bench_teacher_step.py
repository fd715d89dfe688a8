"""Which Fashion-MNIST teacher gives the most per CPU-minute: one MoCo v2 step at 28 px for each candidate.

A step is what ``compress_lit.pretrain`` does per batch, without the loss and the queue (they are the same for
every backbone): the query encoder's forward and backward, the key encoder's forward, an SGD update, under bf16
autocast as ``pretrain_experiment=fashion_mnist_teacher`` runs. Candidates: the wide plain conv net
(``student=convnet_wide``, the teacher ``make reproduce-teacher`` builds), the same with two convolutions per stage,
and the small-input ResNet-18 at half width (the earlier teacher); the students (AlexNet and ResNet-18, small-input,
quarter width) for scale. Median seconds per step at batch 256 after warm-up, and the minutes 20 epochs of 60,000
images would take.

Usage: ``PYTHONPATH=src python benchmarks/bench_teacher_step.py [--steps 6] [--threads 2]``; writes
``benchmarks/results/teacher_step.json``. About 1 min.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, save_result  # noqa: E402

from compress_lit.models import build_backbone  # noqa: E402
from compress_lit.models.convnet import ConvNet  # noqa: E402

CANDIDATES = {
    "convnet_wide (teacher)": lambda: build_backbone("convnet", small_input=True),
    "convnet, 2 convs per stage": lambda: ConvNet(convs_per_stage=2),
    "resnet18_small x0.5 (earlier teacher)": lambda: build_backbone("resnet18", small_input=True, width_multiplier=0.5),
    "alexnet_small (student)": lambda: build_backbone("alexnet", small_input=True, width_multiplier=0.25, fc_dim=1024),
    "resnet18_small (student)": lambda: build_backbone("resnet18", small_input=True, width_multiplier=0.25),
}


def step_seconds(make, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    q, k = make(), make()
    opt = torch.optim.SGD(q.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 28, 28)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = q(x)
            with torch.no_grad():
                k(x)
            loss = out.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "cpu": cpu_model(), "loadavg_start": os.getloadavg()}
    t0 = time.time()
    rows = {}
    steps_20_epochs = 20 * (60000 // args.batch)
    print(f"{'backbone':40s} {'s/step':>8s} {'min for 20 epochs of 60k':>26s}")
    for name, make in CANDIDATES.items():
        s = step_seconds(make, args.batch, args.steps)
        rows[name] = {"seconds_per_step": s, "minutes_20_epochs_60k": s * steps_20_epochs / 60}
        print(f"{name:40s} {s:8.3f} {rows[name]['minutes_20_epochs_60k']:26.1f}", flush=True)
    save_result({"environment": env, "batch": args.batch, "steps": args.steps, "results": rows,
                 "wall_s": time.time() - t0}, Path(__file__).resolve().parent / "results" / "teacher_step.json")


if __name__ == "__main__":
    main()
