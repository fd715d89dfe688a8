"""SEED (Fang et al., *SEED: Self-supervised Distillation for Visual Representation*, ICLR 2021).

The student predicts the teacher's softmax over ``[the teacher's own embedding t, the queue]``: with ``s``, ``t``
the L2-normalised embeddings and ``A`` the queue of past teacher embeddings,

    p_t = softmax([t·t, t·A^T] / T_t),   p_s = softmax([s·t, s·A^T] / T_s),   loss = −Σ_j p_t[j] log p_s[j]

averaged over the batch (soft cross-entropy; the official ``soft_cross_entropy`` in ``tools/utils.py``). Column 0
is the image's own teacher embedding (``t·t = 1``), so at the official ``T_t = 1e-4`` the target is nearly one-hot
on it: the student is pulled to the teacher's embedding of the same image and away from the queue. The arithmetic
runs in float32 even under autocast; a half-precision queue is used as stored (see ``queue_similarities``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .compress import queue_similarities


def seed_logits(emb: torch.Tensor, teacher: torch.Tensor, anchors: torch.Tensor, temperature: float
                ) -> torch.Tensor:
    """``[n(emb)·n(teacher), n(emb)·A^T] / temperature`` as float32, shape (batch, 1 + queue)."""
    e, t = F.normalize(emb.float(), dim=1), F.normalize(teacher.float(), dim=1)
    own = (e * t).sum(1, keepdim=True) / temperature
    return torch.cat([own, queue_similarities(e, anchors, temperature)], dim=1)


def seed_loss(student: torch.Tensor, teacher: torch.Tensor, anchors: torch.Tensor,
              student_temperature: float = 0.2, teacher_temperature: float = 1e-4) -> torch.Tensor:
    """Soft cross-entropy of the student's distribution against the teacher's, averaged over the batch."""
    with torch.autocast(device_type=student.device.type, enabled=False):
        target = F.softmax(seed_logits(teacher, teacher, anchors, teacher_temperature), dim=1)
        log_p = F.log_softmax(seed_logits(student, teacher.detach(), anchors, student_temperature), dim=1)
        return -(target * log_p).sum(1).mean()
