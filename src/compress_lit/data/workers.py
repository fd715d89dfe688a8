"""Data loader workers: ``data.num_workers`` capped at the CPUs this process may run on.

More workers than CPUs only adds processes that wait for each other (and torch warns about it at every loader
it builds): ``data=imagenet`` asks for 8 workers, which on a 2-core machine become 2. The cap is logged once per
process and value.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
_reported: set[tuple[int, int]] = set()


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cap_num_workers(requested: int, key: str = "data.num_workers") -> int:
    """``requested`` loader workers, at most :func:`available_cpus`; says so once when it caps."""
    requested = int(requested)
    cpus = available_cpus()
    if requested <= cpus:
        return requested
    if (requested, cpus) not in _reported:
        _reported.add((requested, cpus))
        log.info("%s=%d capped at %d: only %d CPU%s available to this process", key, requested, cpus, cpus,
                 " is" if cpus == 1 else "s are")
    return cpus
