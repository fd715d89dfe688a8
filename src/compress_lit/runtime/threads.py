"""How many torch threads a command uses: as many as the cores that are actually free when it starts.

torch starts one OpenMP thread per core. When another process keeps a core busy, the thread on that core waits for
it at every parallel region, and the whole step waits for that thread: on a 2-core machine with one busy
neighbour a demo teacher epoch ran 6.7x slower (0.18 against 1.21 steps/s). :func:`choose_threads` measures the
busy share of the cores this process may use over a short window (``/proc/stat``, 0.2 s) and, when some are busy,
sets ``torch.set_num_threads`` to the free ones (at least 1), saying so in one line. With one thread there is no
other thread to wait for, so the wait policy no longer matters. An explicit ``OMP_NUM_THREADS`` (or
``COMPRESS_LIT_THREADS``) is always kept: set it for timings that must not depend on the machine's load.
"""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("compress_lit")
WINDOW_S = 0.2


def _cpu_times() -> dict[int, tuple[int, int]]:
    """``{cpu: (busy jiffies, total jiffies)}`` from ``/proc/stat``."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals]
                idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
                out[int(name[3:])] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def busy_cores(cpus: set[int], window: float = WINDOW_S) -> float:
    """How many of ``cpus`` other processes kept busy over ``window`` seconds (this process sleeps meanwhile)."""
    a = _cpu_times()
    time.sleep(window)
    b = _cpu_times()
    busy = 0.0
    for c in cpus:
        if c in a and c in b and b[c][1] > a[c][1]:
            busy += (b[c][0] - a[c][0]) / (b[c][1] - a[c][1])
    return busy


def choose_threads() -> int | None:
    """Set torch's intra-op threads to the free cores (see the module docstring); returns the number set, or None
    when nothing was changed (an explicit setting, no /proc, or no core busy)."""
    import torch

    explicit = os.environ.get("COMPRESS_LIT_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if os.environ.get("COMPRESS_LIT_THREADS"):
        torch.set_num_threads(max(1, int(explicit)))
        return int(explicit)
    if explicit:
        return None
    try:
        cpus = os.sched_getaffinity(0)
        busy = busy_cores(cpus)
    except (OSError, AttributeError, ValueError):
        return None
    free = max(1, len(cpus) - int(busy + 0.5))
    if free >= torch.get_num_threads():
        return None
    log.info("%.1f of %d cores are busy with other work: torch uses %d thread(s) (set OMP_NUM_THREADS to choose)",
             busy, len(cpus), free)
    torch.set_num_threads(free)
    return free


__all__ = ["busy_cores", "choose_threads"]
