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


def batchnorm_parameters(model) -> set[int]:
    """``id`` of every parameter (weight and bias) of the BatchNorm layers of ``model`` (any ``_BatchNorm``:
    1d/2d/3d and SyncBatchNorm)."""
    from torch import nn

    return {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)}


def split_batchnorm_groups(groups: list[dict], model) -> list[dict]:
    """Each param group split in two: its non-BatchNorm parameters (unchanged options) and its BatchNorm weights and
    biases in a group ``<name>_bn`` with ``weight_decay`` 0. Empty groups are dropped. Biases of convolutions and
    linear layers keep their weight decay: that is what the official CompReSS cluster-classification script
    (``train_kmeans.py``) does (it exempts the parameters of its ``BatchNorm2d`` layers only)."""
    bn = batchnorm_parameters(model)
    out = []
    for i, g in enumerate(groups):
        params = list(g["params"])
        name = g.get("name", f"group{i}")
        rest = {k: v for k, v in g.items() if k != "params"}
        plain = [p for p in params if id(p) not in bn]
        norm = [p for p in params if id(p) in bn]
        if plain:
            out.append({**rest, "params": plain})
        if norm:
            out.append({**rest, "name": f"{name}_bn", "params": norm, "weight_decay": 0.0})
    return out


def build_optimizer(params, optim_cfg, model=None):
    """SGD + per-epoch LambdaLR from an OptimConfig; returns Lightning's optimizer/scheduler dict.

    ``params``: parameters or param groups (dicts with ``params``). ``optim_cfg.nesterov``: Nesterov momentum.
    ``optim_cfg.bn_weight_decay=false``: the BatchNorm parameters of ``model`` (which must then be given) get no
    weight decay (see :func:`split_batchnorm_groups`). Configs without these keys get plain SGD, BN decayed.
    """
    import torch

    nesterov = bool(getattr(optim_cfg, "nesterov", False))
    if not getattr(optim_cfg, "bn_weight_decay", True):
        if model is None:
            raise ValueError("optim.bn_weight_decay=false needs the model to find its BatchNorm parameters")
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"name": "params", "params": params}]
        params = split_batchnorm_groups(groups, model)
    opt = torch.optim.SGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                          weight_decay=optim_cfg.weight_decay, nesterov=nesterov)
    sched = LRSchedule(kind=optim_cfg.scheduler, epochs=optim_cfg.epochs, milestones=list(optim_cfg.milestones),
                       gamma=optim_cfg.gamma, warmup_epochs=optim_cfg.warmup_epochs)
    return {"optimizer": opt,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, sched), "interval": "epoch"}}
