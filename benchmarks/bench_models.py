"""Throughput of today's teacher and student at 224 px on this CPU: a DINOv2 ViT-B/14 teacher and a MobileNetV3-Large
student (``experiment=dinov2_vitb14_to_mobilenetv3``).

The real architectures with random weights (the numbers do not depend on the weights), built by the project's own
code (``build_backbone``), in one process:

* ``teacher_forward``: the frozen teacher's embedding (``FrozenTeacher``, eval mode, ``torch.inference_mode``) at
  224 px: 16 x 16 patches, so its 37 x 37 position table is interpolated at every forward, as in training;
* ``student_forward``: the student's embedding, eval mode, no gradient;
* ``student_train``: the student's forward + backward in train mode (a sum of the embedding as the loss), the part of
  a distillation step that a cached teacher (``teacher.cached=true``) leaves.

Each reports the median over ``--rounds`` timed batches (after one warm-up batch) as images/s and ms/image, with
the FLOPs per image (``torch.utils.flop_counter``: 2 per multiply-add) and the parameter count. The summary says
how many student training images one teacher image costs: the time a CompReSS step spends in the teacher, which
``teacher.cached=true`` (or a GPU) removes.

Usage: ``PYTHONPATH=src python benchmarks/bench_models.py [--rounds 3] [--teacher-batch 4] [--student-batch 16]
[--threads N] [--quick]``; prints a table, writes ``benchmarks/results/models.json`` (about 1 min on 2 cores).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_model, save_result  # noqa: E402

from compress_lit.exporting.measure import count_flops  # noqa: E402
from compress_lit.models import build_backbone  # noqa: E402
from compress_lit.teachers import FrozenTeacher  # noqa: E402

TEACHER, STUDENT = "vit_base_patch14_dinov2", "mobilenetv3_large"


def environment() -> dict:
    import timm
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu": cpu_model(), "loadavg_start": os.getloadavg()}


def timed(step, batch: int, rounds: int) -> dict:
    step()  # warm-up (allocations, oneDNN primitive caches)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"batch": batch, "rounds": rounds, "median_s_per_batch": med, "images_per_s": batch / med,
            "ms_per_image": 1000 * med / batch, "times_s": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--teacher-batch", type=int, default=4)
    ap.add_argument("--student-batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, small batches")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "models.json"))
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.teacher_batch, args.student_batch = 1, 1, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    env = environment()
    torch.manual_seed(0)
    size = args.size
    teacher = FrozenTeacher(build_backbone(TEACHER), TEACHER)
    student = build_backbone(STUDENT)
    one = torch.randn(1, 3, size, size)
    info = {}
    for role, model in (("teacher", teacher), ("student", student)):
        model.eval()
        info[role] = {"arch": model.backbone.arch_name if role == "teacher" else model.arch_name,
                      "params": sum(p.numel() for p in model.parameters()), "embed_dim": int(model.embed_dim),
                      "gflops_per_image": count_flops(model, one) / 1e9}

    xt = torch.randn(args.teacher_batch, 3, size, size)
    xs = torch.randn(args.student_batch, 3, size, size)

    def teacher_step():
        with torch.inference_mode():
            teacher(xt)

    def student_forward():
        with torch.inference_mode():
            student(xs)

    def student_train():
        student.zero_grad(set_to_none=True)
        student(xs).float().sum().backward()

    rows = {"teacher_forward": timed(teacher_step, args.teacher_batch, args.rounds)}
    student.eval()
    rows["student_forward"] = timed(student_forward, args.student_batch, args.rounds)
    student.train()
    rows["student_train"] = timed(student_train, args.student_batch, args.rounds)
    ratio = rows["teacher_forward"]["ms_per_image"] / rows["student_train"]["ms_per_image"]

    print(f"\n{size} px, {torch.get_num_threads()} torch threads, {cpu_model()}")
    print(f"{'model':<44} {'params':>11} {'GFLOPs/img':>11} {'batch':>6} {'img/s':>8} {'ms/img':>8}")
    for name, row in rows.items():
        role = name.split("_")[0]
        label = f"{name} ({info[role]['arch']})"
        print(f"{label:<44} {info[role]['params']:>11,} {info[role]['gflops_per_image']:>11.2f} {row['batch']:>6} "
              f"{row['images_per_s']:>8.2f} {row['ms_per_image']:>8.1f}")
    print(f"one teacher image costs as much as {ratio:.1f} student training images (forward + backward): of the "
          f"two, the online teacher takes {ratio / (1 + ratio):.0%} of a step's time (teacher.cached=true removes it)")
    result = {"benchmark": "models", "image_size": size, "models": info, "rows": rows,
              "teacher_over_student_train_per_image": ratio, "teacher_share_of_online_step": ratio / (1 + ratio),
              "quick": args.quick, "environment": env, "wall_s": time.perf_counter() - start}
    save_result(result, args.out)


if __name__ == "__main__":
    main()
