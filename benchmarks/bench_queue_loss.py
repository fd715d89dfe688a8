"""Benchmark of one CompReSS-2q loss + queue-update step: ours against the official scripts' formulation.

Both formulations compute the same thing for a batch of student and teacher embeddings (forward and backward
with respect to the student embedding, as in training) and then write the batch's keys into both queues:

* **ours** — ``compress_lit.losses.compress.compress_loss`` against the queue buffers themselves, keys staged with
  ``AnchorQueue.stage`` and written after the backward with ``AnchorQueue.flush`` (an in-place ring write of one
  batch per bank; no copy of the queue).
* **official** — the direct formulation of the official scripts: every step ``queue.clone().detach()`` of both
  banks, the similarities against the clones, softmax / KL, then ``index_copy_`` of the new keys into the
  queues (the clone is what makes writing the queue before the backward safe).

Sizes (batch 256, 128,000 anchors): MoCo R50 teacher (2048-d) with a ResNet-18 student (512-d), and SimCLR
R50x4 teacher (8192-d) with an AlexNet student (4096-d). For each formulation: median time per step (timed steps
alternate between the two formulations, after one untimed warm-up step each), the time of the two clones alone
(timed inside the official step), the peak RSS growth during a step (``/proc/self/status`` VmHWM, reset through
``/proc/self/clear_refs`` before each step), and — from ``torch.profiler`` with ``profile_memory=True`` on the
warm-up step — the largest single allocation made by any op and whether any allocation was queue-sized
(at least the smaller bank's bytes). A small-size check asserts the two formulations give the same loss and
gradient before anything is timed.

Usage: ``PYTHONPATH=src python benchmarks/bench_queue_loss.py [--steps N] [--steps-large N] [--quick]``; prints
a table, writes ``benchmarks/results/queue_loss.json``.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, save_result  # noqa: E402

from compress_lit.methods.anchor_queue import AnchorQueue  # noqa: E402
from compress_lit.losses.compress import compress_loss  # noqa: E402

TEMPERATURE = 0.04


# ------------------------------------------------------------------------------------------------------------
# environment and memory helpers
# ------------------------------------------------------------------------------------------------------------


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu": cpu_model(), "machine": platform.machine(),
            "loadavg_start": os.getloadavg()}


def _status_kb(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak RSS growth (bytes) over a block: VmHWM after the block minus VmRSS before it."""

    def __enter__(self):
        self.ok = reset_peak_rss()
        self.start = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        hwm = _status_kb("VmHWM")
        self.delta = (hwm - self.start) * 1024 if (self.ok and hwm is not None and self.start is not None) else None
        return False


def _root_op(node) -> str:
    """The outermost op (e.g. ``aten::clone``) above a profiler node."""
    name = None
    while node is not None:
        if getattr(node, "name", None) and not node.name.startswith("[memory]"):
            name = node.name
        node = node.parent
    return name or "(outside any op)"


def allocation_profile(fn, threshold: int) -> dict:
    """Run ``fn`` under ``torch.profiler`` (profile_memory) and summarise the torch CPU allocations it made.

    ``peak_alloc_bytes``: the peak of bytes allocated by torch's CPU allocator during ``fn`` and still live
    (allocations from before ``fn`` not counted); ``largest_alloc_bytes`` / ``largest_alloc_op``: the largest
    single allocation and the outermost op that made it; ``queue_sized_allocs``: every allocation of at least
    ``threshold`` bytes, with its op.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = []  # (time, size, total allocated after it, outermost op)
    try:  # the allocation records themselves (a semi-private profiler API)
        def walk(nodes):
            for n in nodes:
                yield n
                yield from walk(n.children)

        for n in walk(prof.profiler.kineto_results.experimental_event_tree()):
            ef = n.extra_fields
            if type(ef).__name__ == "_ExtraFields_Allocation":
                allocs.append((n.start_time_ns, int(ef.alloc_size), int(ef.total_allocated), _root_op(n.parent)))
        allocs.sort()
        source = "profiler allocation records"
    except Exception:  # noqa: BLE001 - fall back to the per-op self allocations (no peak available)
        allocs = [(0, int(e.self_cpu_memory_usage), None, e.name) for e in prof.events()
                  if e.self_cpu_memory_usage > 0]
        source = "profiler per-op self memory"
    positive = sorted((a for a in allocs if a[1] > 0), key=lambda a: -a[1])
    peak = None
    if allocs and allocs[0][2] is not None:
        base = allocs[0][2] - allocs[0][1]
        peak = max(a[2] for a in allocs) - base
    return {"peak_alloc_bytes": peak,
            "largest_alloc_bytes": positive[0][1] if positive else 0,
            "largest_alloc_op": positive[0][3] if positive else "",
            "queue_sized_allocs": [(op, size) for _, size, _, op in positive if size >= threshold],
            "allocs_over_1MB": [(op, size) for _, size, _, op in positive if size >= 1 << 20][:12],
            "source": source}


# ------------------------------------------------------------------------------------------------------------
# the two formulations
# ------------------------------------------------------------------------------------------------------------
def ours_step(queues: AnchorQueue, student: torch.Tensor, teacher: torch.Tensor, keys: torch.Tensor):
    """Loss against the queue buffers, backward w.r.t. the student embedding, then the in-place ring write."""
    s = student.detach().requires_grad_(True)
    loss = compress_loss(s, teacher, queues.bank("student"), queues.bank("teacher"), TEMPERATURE)
    queues.stage(teacher=F.normalize(teacher, dim=1), student=F.normalize(keys, dim=1))
    loss.backward()
    queues.flush()
    return loss.detach(), s.grad


class OfficialQueue:
    """The official scripts' queue handling: clone both queues every step, index_copy_ the new keys."""

    def __init__(self, bank_t: torch.Tensor, bank_s: torch.Tensor):
        self.bank_t, self.bank_s = bank_t, bank_s
        self.size = bank_t.shape[0]
        self.index = 0
        self.clone_s = 0.0  # time of the two clones in the last step

    def step(self, student: torch.Tensor, teacher: torch.Tensor, keys: torch.Tensor):
        s = student.detach().requires_grad_(True)
        q_t = F.normalize(teacher, dim=1)
        q_s = F.normalize(s, dim=1)
        t0 = time.perf_counter()
        anchors_t = self.bank_t.clone().detach()
        anchors_s = self.bank_s.clone().detach()
        self.clone_s = time.perf_counter() - t0
        sim_t = torch.mm(q_t, anchors_t.t()) / TEMPERATURE
        sim_s = torch.mm(q_s, anchors_s.t()) / TEMPERATURE
        loss = F.kl_div(F.log_softmax(sim_s, dim=1), F.softmax(sim_t, dim=1), reduction="batchmean")
        with torch.no_grad():
            ids = (torch.arange(q_t.shape[0]) + self.index) % self.size
            self.bank_t.index_copy_(0, ids, q_t)
            self.bank_s.index_copy_(0, ids, F.normalize(keys, dim=1))
            self.index = (self.index + q_t.shape[0]) % self.size
        loss.backward()
        return loss.detach(), s.grad


def check_same_result(batch: int = 32, size: int = 4096, dt: int = 256, ds: int = 64) -> dict:
    """Both formulations: the same loss, the same gradient and the same queue contents after one step."""
    torch.manual_seed(0)
    q = AnchorQueue(size, {"teacher": dt, "student": ds})
    ref = {k: v.clone() for k, v in q.state_dict().items()}
    off = OfficialQueue(ref["bank_teacher"], ref["bank_student"])
    s, t, k = torch.randn(batch, ds), torch.randn(batch, dt), torch.randn(batch, ds)
    l1, g1 = ours_step(q, s, t, k)
    l2, g2 = off.step(s, t, k)
    out = {"loss_abs_diff": float((l1 - l2).abs()), "grad_max_abs_diff": float((g1 - g2).abs().max()),
           "queues_equal": bool(torch.equal(q.bank("teacher"), off.bank_t)
                                and torch.equal(q.bank("student"), off.bank_s))}
    assert out["loss_abs_diff"] < 1e-4 * max(1.0, abs(float(l1))), out
    assert out["grad_max_abs_diff"] < 1e-5, out
    assert out["queues_equal"], out
    return out


# ------------------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------------------
def bench_case(name: str, size: int, dt: int, ds: int, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    queues = AnchorQueue(size, {"teacher": dt, "student": ds})
    official = OfficialQueue(queues.bank("teacher"), queues.bank("student"))  # the same buffers: same memory
    bank_bytes = {b: queues.bank(b).numel() * queues.bank(b).element_size() for b in queues.bank_names}
    threshold = min(bank_bytes.values())
    student, teacher, keys = torch.randn(batch, ds), torch.randn(batch, dt), torch.randn(batch, ds)
    runs = {"ours": lambda: ours_step(queues, student, teacher, keys),
            "official": lambda: official.step(student, teacher, keys)}

    res: dict = {"case": name, "queue": size, "teacher_dim": dt, "student_dim": ds, "batch": batch,
                 "bank_bytes": bank_bytes, "queue_sized_threshold_bytes": threshold, "timed_steps": steps}
    for which, fn in runs.items():  # the warm-up step, profiled for its allocations
        res[which] = allocation_profile(fn, threshold)
        res[which]["queue_sized_temporary"] = bool(res[which]["queue_sized_allocs"])
    times = {k: [] for k in runs}
    rss = {k: [] for k in runs}
    clone = []
    for _ in range(steps):  # alternate, so that a change of machine load hits both alike
        for which, fn in runs.items():
            with PeakRSS() as p:
                t0 = time.perf_counter()
                fn()
                times[which].append(time.perf_counter() - t0)
            rss[which].append(p.delta)
            if which == "official":
                clone.append(official.clone_s)
    for which in runs:
        r = res[which]
        r["step_s"] = times[which]
        r["step_s_median"] = statistics.median(times[which])
        r["peak_rss_delta_bytes"] = rss[which]
        vals = [v for v in rss[which] if v is not None]
        r["peak_rss_delta_bytes_median"] = statistics.median(vals) if vals else None
    res["official"]["clone_s"] = clone
    res["official"]["clone_s_median"] = statistics.median(clone)
    res["speedup"] = res["official"]["step_s_median"] / res["ours"]["step_s_median"]
    res["clone_share_of_official_step"] = res["official"]["clone_s_median"] / res["official"]["step_s_median"]
    return res


def _mb(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def print_table(cases: list[dict]) -> None:
    print(f"\nCompReSS-2q loss + queue update per step (forward + backward w.r.t. the student embedding), "
          f"CPU, {torch.get_num_threads()} threads; medians")
    head = (f"  {'case':<28}{'formulation':<12}{'step s':>9}{'clone s':>9}{'peak alloc MB':>15}"
            f"{'largest MB':>12}{'peak RSS +MB':>14}  queue-sized temporary?")
    print(head)
    print("  " + "-" * (len(head) - 2))
    for c in cases:
        for which in ("official", "ours"):
            r = c[which]
            clone = f"{r['clone_s_median']:.3f}" if which == "official" else "-"
            temp = ("yes: " + ", ".join(sorted({op for op, _ in r["queue_sized_allocs"]}))
                    if r["queue_sized_temporary"] else "no")
            print(f"  {c['case']:<28}{which:<12}{r['step_s_median']:>9.3f}{clone:>9}"
                  f"{_mb(r['peak_alloc_bytes']):>15}{_mb(r['largest_alloc_bytes']):>12}"
                  f"{_mb(r['peak_rss_delta_bytes_median']):>14}  {temp}")
        print(f"  {'':<28}speed-up ours vs official: {c['speedup']:.2f}x  (clone = "
              f"{100 * c['clone_share_of_official_step']:.0f}% of the official step; "
              f"{c['timed_steps']} timed steps each)")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queue", type=int, default=128_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per formulation, 2048-d case")
    ap.add_argument("--steps-large", type=int, default=2, help="timed steps per formulation, 8192-d case")
    ap.add_argument("--quick", action="store_true", help="queue 8,000 (smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "queue_loss.json"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.queue = 8000

    t_start = time.perf_counter()
    env = environment()
    check = check_same_result()
    print(f"same loss / gradient / queue at a small size: {check}")
    cases = []
    for name, dt, ds, steps in (("R50 2048 -> R18 512", 2048, 512, a.steps),
                                ("R50x4 8192 -> AlexNet 4096", 8192, 4096, a.steps_large)):
        print(f"running {name}: queue {a.queue} ...", flush=True)
        cases.append(bench_case(name, a.queue, dt, ds, a.batch, steps))
    print_table(cases)
    env["loadavg_end"] = os.getloadavg()
    env["peak_rss_measurable"] = reset_peak_rss()
    result = {"environment": env, "check": check, "cases": cases, "quick": a.quick,
              "wall_s": time.perf_counter() - t_start}
    save_result(result, a.out)
    return result


if __name__ == "__main__":
    main()
