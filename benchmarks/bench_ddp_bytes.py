"""Bytes that the collectives of one DDP training step move: DDP's default (``broadcast_buffers=True``: every buffer,
the anchor queues included, re-broadcast from rank 0 at each forward) against the library's strategy (no buffer
broadcast; the queues are identical on every process through the gather of the keys).

Measured on 2 CPU processes (gloo) with the small CompReSS-2q model of ``tests/scripts/ddp_run.py`` (20-slot queue),
then the per-step queue broadcast is worked out for the paper's sizes (128,000 anchors, fp32, two banks):
teacher dim + student dim floats per slot.

Usage: ``python benchmarks/bench_ddp_bytes.py``; writes ``benchmarks/results/ddp_bytes.json``.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, save_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ddp_run.py"
PAPER_PAIRS = {  # teacher dim + student queue dim (the ResNet-50 student's queue holds its 8192-d training head)
    "MoCo v2 R50 -> ResNet-18": 2048 + 512,
    "SimCLR R50x4 -> AlexNet": 8192 + 4096,
    "SimCLR R50x4 -> ResNet-50": 8192 + 8192,
}


def measure(broadcast_buffers: bool, port: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "state.pt"
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(port))
        cmd = [sys.executable, str(SCRIPT), "2", str(out), "2q", *(["broadcast_buffers"] if broadcast_buffers else [])]
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=600)
        counted = json.loads(Path(f"{out}.bytes.json").read_text())
    per_kind = collections.Counter()
    for kind, nbytes in counted["transfers"]:
        per_kind[kind] += nbytes / counted["steps"]
    return {"bytes_per_step": sum(per_kind.values()), "by_collective": dict(per_kind),
            "queue_bytes": counted["queue_bytes"], "steps": counted["steps"]}


def main() -> None:
    t0 = time.time()
    result = {"environment": {"cpu": cpu_model(), "loadavg_start": os.getloadavg()}}
    before = measure(True, 29611)
    after = measure(False, 29612)
    result["ddp_default_broadcast_buffers"] = before
    result["compress_lit_strategy"] = after
    result["ratio_before_over_after"] = before["bytes_per_step"] / after["bytes_per_step"]
    result["paper_queue_broadcast_GB_per_step"] = {k: 128_000 * d * 4 / 1e9 for k, d in PAPER_PAIRS.items()}
    result["wall_s"] = time.time() - t0
    print(f"{'bytes per step (2 processes)':34s} {'DDP default':>12s} {'ours':>12s}")
    for kind in sorted(set(before["by_collective"]) | set(after["by_collective"])):
        print(f"  {kind:32s} {before['by_collective'].get(kind, 0):12.0f} {after['by_collective'].get(kind, 0):12.0f}")
    print(f"  {'total':32s} {before['bytes_per_step']:12.0f} {after['bytes_per_step']:12.0f}   "
          f"ratio {result['ratio_before_over_after']:.2f}x (queue {after['queue_bytes']} bytes)")
    for k, gb in result["paper_queue_broadcast_GB_per_step"].items():
        print(f"  at the paper's sizes, {k}: DDP's default would re-broadcast {gb:.2f} GB of queue per step; ours 0")
    save_result(result, ROOT / "benchmarks" / "results" / "ddp_bytes.json")


if __name__ == "__main__":
    main()
