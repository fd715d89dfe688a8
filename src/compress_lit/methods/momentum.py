"""Momentum (EMA) copies of networks, as used by the 2q student queue and by MoCo pretraining."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_momentum_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with the same weights whose parameters take no gradient."""
    m = copy.deepcopy(module)
    m.requires_grad_(False)
    return m


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target ← momentum · target + (1 − momentum) · source`` on parameters (buffers are the target's own)."""
    t_params = [p for p in target.parameters()]
    s_params = [p.detach() for p in source.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("momentum copy and source have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
