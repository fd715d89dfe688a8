"""Learning-rate schedules as epoch → factor callables (picklable, so LambdaLR saves them in checkpoints)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class LRSchedule:
    """Factor applied to the base learning rate at a given epoch.

    ``multistep``: ×gamma after each milestone (the paper: ×0.2 after 90 and 120); ``cosine``: half-cosine
    from 1 to 0 over ``epochs``; ``constant``: 1. A linear warm-up over ``warmup_epochs`` multiplies any of them.
    """

    kind: str = "multistep"
    epochs: int = 130
    milestones: list[int] = field(default_factory=lambda: [90, 120])
    gamma: float = 0.2
    warmup_epochs: int = 0

    def __call__(self, epoch: int) -> float:
        if self.kind == "multistep":
            f = self.gamma ** sum(epoch >= m for m in self.milestones)
        elif self.kind == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * min(epoch, self.epochs) / self.epochs))
        elif self.kind == "constant":
            f = 1.0
        else:
            raise ValueError(f"unknown schedule {self.kind!r}")
        if epoch < self.warmup_epochs:
            f *= (epoch + 1) / (self.warmup_epochs + 1)
        return f


def build_optimizer(params, optim_cfg):
    """SGD + per-epoch LambdaLR from an OptimConfig; returns Lightning's optimizer/scheduler dict."""
    import torch

    opt = torch.optim.SGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                          weight_decay=optim_cfg.weight_decay)
    sched = LRSchedule(kind=optim_cfg.scheduler, epochs=optim_cfg.epochs, milestones=list(optim_cfg.milestones),
                       gamma=optim_cfg.gamma, warmup_epochs=optim_cfg.warmup_epochs)
    return {"optimizer": opt,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, sched), "interval": "epoch"}}
