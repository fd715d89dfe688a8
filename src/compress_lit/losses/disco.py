"""DisCo (Gao et al., *DisCo: Remedying Self-Supervised Learning on Lightweight Models with Distilled Contrastive
Learning*, ECCV 2022): the student's own MoCo v2 loss plus the consistency of its final embedding with the
teacher's, on both augmented views.

    loss = InfoNCE(q_1, k, queue; T) + w · (||n(q_1) − n(t_1)||² + ||n(q_2) − n(t_2)||²)

``q_v``: the student's (query encoder's) final embedding of view ``v``; ``t_v``: the teacher's embedding of the same
view; ``k``: the momentum encoder's key of view 2 (the positive of ``q_1``); ``queue``: past keys (negatives).
Each squared distance is averaged over the batch (``regression_loss``). The official ``main.py`` adds the two
consistency terms with weight 1 to the InfoNCE loss, but with ``nn.MSELoss(reduction='sum')``, i.e. summed over
each GPU's batch of 32 rather than averaged: relative to the (averaged) InfoNCE term its consistency weight is
32x ours per sample. ``w`` (``method.disco_weight``) is the knob to sweep.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .regression import regression_loss


def disco_loss(q1: torch.Tensor, q2: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t1: torch.Tensor,
               t2: torch.Tensor, temperature: float = 0.2, weight: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, contrastive, consistency)``; ``k`` and ``queue`` normalised, the rest normalised here."""
    from ..methods.moco import info_nce  # MoCo v2's own InfoNCE (imported late: methods import this package)

    contrastive = info_nce(F.normalize(q1.float(), dim=1), k, queue, temperature)
    consistency = regression_loss(q1, t1) + regression_loss(q2, t2)
    return contrastive + weight * consistency, contrastive, consistency
