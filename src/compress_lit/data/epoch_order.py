"""The training order of one process in one epoch, as the torch loader under DDP has it (for loaders that are not a
torch ``DataLoader``, e.g. the DALI loader).

Lightning gives a torch training loader under DDP a ``DistributedSampler(shuffle=True, drop_last=False,
seed=PL_GLOBAL_SEED)`` with ``set_epoch(epoch)``: a permutation of the ``n`` samples seeded by ``seed + epoch``,
padded with its own first indices to a multiple of the world size, of which rank ``r`` takes positions
``r, r + W, r + 2W, ...``; the loader (``drop_last=True``) then drops the last incomplete batch of each process.
:func:`epoch_order` is that order, taken from torch's own ``DistributedSampler``, cut to whole batches. On one
process it is the same rule with ``W = 1`` (a new seeded permutation each epoch; the torch loader's
``RandomSampler`` draws from the global generator instead).
"""
from __future__ import annotations

import math
import os


def global_seed(default: int = 0) -> int:
    """The seed Lightning's distributed sampler uses: ``PL_GLOBAL_SEED`` (set by ``seed_everything``)."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))


def batches_per_epoch(n: int, world_size: int, batch_size: int) -> int:
    """Batches each process runs per epoch: ``ceil(n / W) // per-process batch`` (the torch rule)."""
    return math.ceil(n / world_size) // batch_size


def epoch_order(n: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1, batch_size: int = 1) -> list[int]:
    """Sample indices process ``rank`` of ``world_size`` reads in ``epoch``, in order: whole batches of
    ``batch_size`` only (:func:`batches_per_epoch` of them)."""
    from torch.utils.data.distributed import DistributedSampler

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    order = list(sampler)
    keep = batches_per_epoch(n, world_size, batch_size) * batch_size
    return order[:keep]
