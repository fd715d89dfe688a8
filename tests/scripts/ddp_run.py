"""Train CompReSS for a few steps on a fixed dataset, either on 2 CPU processes (DDP, gloo) with batch
B each or on 1 process with batch 2B whose data order equals what the 2 processes see together. Writes the final
state_dict (rank 0). Used by tests/test_ddp.py and benchmarks/bench_ddp_bytes.py.

The 2-process run uses the library's DDP strategy (``compress_lit.runtime.distributed.ddp_strategy``) and counts the bytes
each collective moves during training (gradient all-reduce through a counting DDP comm hook; buffer broadcasts,
all-gathers, all-reduces and broadcasts through the torch.distributed functions DDP and Lightning call), written
next to the state_dict as ``<out>.bytes.json``. A 5th argument ``broadcast_buffers`` restores DDP's default
per-step buffer broadcast, for the before/after comparison.
"""
import json
import sys

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from compress_lit.runtime.config import OptimConfig
from compress_lit.runtime.distributed import ddp_strategy
from compress_lit.methods import CompReSS
from compress_lit.models import build_backbone
from compress_lit.teachers import FrozenTeacher

N, B, STEPS = 48, 8, 3


class Indexed(Dataset):
    def __init__(self, order):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 3, 16, 16, generator=g)
        self.order = order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        j = self.order[i]
        return self.x[j], 0, j


class RankStrided(Sampler):
    """Rank r of w reads samples r, r+w, r+2w, ... in order (decided at iteration time, after DDP set-up)."""

    def __len__(self):
        return N // 2

    def __iter__(self):
        rank = dist.get_rank() if dist.is_initialized() else 0
        return iter(range(rank, N, 2))


TRANSFERS: list = []  # (collective, bytes), recorded while COUNTING
COUNTING = [False]


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def _count_collectives() -> None:
    for name, arg in (("_broadcast_coalesced", 1), ("all_gather", 1), ("all_reduce", 0), ("broadcast", 0),
                      ("all_gather_into_tensor", 1)):
        orig = getattr(dist, name)

        def wrapped(*a, __orig=orig, __name=name, __arg=arg, **k):
            if COUNTING[0]:
                TRANSFERS.append((__name.lstrip("_"), _nbytes(a[__arg]) if len(a) > __arg else 0))
            return __orig(*a, **k)
        setattr(dist, name, wrapped)


def counting_allreduce(state, bucket):
    counting = COUNTING[0]
    if counting:
        TRANSFERS.append(("gradient_all_reduce", _nbytes(bucket.buffer())))
    COUNTING[0] = False  # the hook's own all_reduce is this transfer, counted once
    try:
        return default_hooks.allreduce_hook(state, bucket)
    finally:
        COUNTING[0] = counting


class Counting(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        # Lightning registers comm hooks on CUDA only: register the counting one on the wrapped model directly
        trainer.strategy.model.register_comm_hook(None, counting_allreduce)
        COUNTING[0] = True

    def on_train_end(self, trainer, pl_module):
        COUNTING[0] = False


def main(devices: int, out: str, variant: str, broadcast_buffers: bool = False) -> None:
    pl.seed_everything(0)
    teacher = FrozenTeacher(build_backbone("resnet18", small_input=True, width_multiplier=0.25))
    # AlexNet has no BatchNorm (SyncBN needs GPUs) and dropout is off, so 2 x B and 1 x 2B are the same maths
    student = build_backbone("alexnet", small_input=True, width_multiplier=0.125, fc_dim=64, dropout=0.0)
    optim = OmegaConf.structured(OptimConfig(lr=0.1, epochs=1, scheduler="constant", milestones=[]))
    kw = dict(use_momentum_encoder=variant == "2q", one_queue=variant == "1q")
    module = CompReSS(student, teacher, optim, queue_size=20, momentum=0.5, **kw)  # 3 x 16 keys wrap 20 slots
    if devices == 2:
        order, batch, sampler = list(range(N)), B, RankStrided()
        _count_collectives()
        strategy = ddp_strategy("ddp", **({"broadcast_buffers": True} if broadcast_buffers else {}))
        trainer_kw = dict(devices=2, strategy=strategy, use_distributed_sampler=False, callbacks=[Counting()])
    else:
        r0, r1 = list(range(0, N, 2)), list(range(1, N, 2))
        order = [i for s in range(N // (2 * B)) for i in r0[s * B:(s + 1) * B] + r1[s * B:(s + 1) * B]]
        batch, trainer_kw, sampler = 2 * B, dict(devices=1), None
    loader = DataLoader(Indexed(order), batch_size=batch, sampler=sampler, shuffle=False, drop_last=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **trainer_kw)
    trainer.fit(module, loader)
    if trainer.is_global_zero:
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, out)
        if devices == 2:
            queue_bytes = sum(_nbytes(b) for n, b in module.queues.named_buffers() if n.startswith("bank_"))
            with open(f"{out}.bytes.json", "w") as f:
                json.dump({"steps": STEPS, "queue_bytes": queue_bytes, "transfers": TRANSFERS}, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], len(sys.argv) > 4 and sys.argv[4] == "broadcast_buffers")
