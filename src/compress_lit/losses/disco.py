"""DisCo (Gao et al., *DisCo: Remedying Self-Supervised Learning on Lightweight Models with Distilled Contrastive
Learning*, ECCV 2022): the student's own MoCo v2 loss plus the consistency of its final embedding with the
teacher's, on both augmented views.

    loss = InfoNCE(q_1, k, queue; T) + w · (||n(q_1) − n(t_1)||² + ||n(q_2) − n(t_2)||²)

``q_v``: the student's (query encoder's) final embedding of view ``v``; ``t_v``: the teacher's embedding of the same
view; ``k``: the momentum encoder's key of view 2 (the positive of ``q_1``); ``queue``: past keys (negatives).
InfoNCE and each squared distance are averaged over the batch (``regression_loss``).

The weight. The official ``DisCo/main.py`` computes, on each GPU of its 8 x 32 images,
``loss = CrossEntropyLoss()(logits) + MSELoss(reduction='sum')(t_1, q_1) + MSELoss(reduction='sum')(t_2, q_2)``
(normalised vectors; ``only_mse`` off): the InfoNCE is averaged over the GPU's 32 images, each consistency term summed
over them. DistributedDataParallel averages the 8 GPUs' gradients, so the objective it descends is

    (1/8) Σ_g [ (1/32) Σ_{i∈g} nce_i + Σ_{i∈g} (c1_i + c2_i) ] = mean_i nce_i + 32 · mean_i (c1_i + c2_i),

i.e. ``w = 32`` (:data:`DISCO_WEIGHT`, the default of ``method.disco_weight``) on our per-sample means. The 32 is the
official per-GPU batch, not a property of the method: the official code run on 4 GPUs x 64 would weigh 64. We keep
the published runs' 32 whatever our batch, device count or BatchNorm groups, so the balance of the two terms (and the
gradient of each) is the published one: with means on each process and DDP's gradient average, our objective is the
same on one device and on many. ``w = 1`` (this library's default before) weighs the consistency 32x less than the
official code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .regression import regression_loss

#: the official consistency weight relative to per-sample means: DisCo's per-GPU batch (256 images on 8 GPUs)
DISCO_WEIGHT = 32.0


def disco_loss(q1: torch.Tensor, q2: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t1: torch.Tensor,
               t2: torch.Tensor, temperature: float = 0.2, weight: float = DISCO_WEIGHT
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, contrastive, consistency)``; ``k`` and ``queue`` normalised, the rest normalised here."""
    from ..methods.moco import info_nce  # MoCo v2's own InfoNCE (imported late: methods import this package)

    contrastive = info_nce(F.normalize(q1.float(), dim=1), k, queue, temperature)
    consistency = regression_loss(q1, t1) + regression_loss(q2, t2)
    return contrastive + weight * consistency, contrastive, consistency
