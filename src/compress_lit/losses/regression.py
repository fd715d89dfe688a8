"""Regression of normalised embeddings: the Regression / Regression-BN baselines and SimReg (Navaneet et al.,
BMVC 2021), which differ only in the head that produces ``pred`` (one linear layer, or a deeper MLP).

loss = mean over the batch of ``||n(pred) - n(target)||²`` with ``n`` the L2 normalisation, i.e. the mean of
``2 - 2 cos(pred, target)`` (SimReg's official ``simreg.py``: ``2 - 2 * <query, target>`` on normalised vectors).
Computed in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the squared L2 distance of the normalised rows (= mean of ``2 - 2 cos``)."""
    p, t = F.normalize(pred.float(), dim=1), F.normalize(target.float(), dim=1)
    return (p - t).pow(2).sum(1).mean()
