"""The CRD baseline's contrast (Tian et al., *Contrastive Representation Distillation*, ICLR 2020), as InfoNCE
with per-anchor candidates (the memories and their sampling are in :mod:`compress_lit.methods.baselines`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crd_info_nce(anchor: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with per-anchor candidates: ``anchor`` ``(B, D)``, ``candidates`` ``(B, 1 + K, D)`` with the positive
    in row 0 and the K negatives after it (all normalised); cross-entropy of column 0 among
    ``[a·c_0, a·c_1 .. a·c_K] / T``, averaged over the batch."""
    logits = torch.bmm(candidates.float(), anchor.float().unsqueeze(2)).squeeze(2) / temperature
    return F.cross_entropy(logits, torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device))
