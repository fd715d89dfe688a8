"""CompReSS (Abbasi Koohpayegani et al., NeurIPS 2020): KL(teacher ‖ student) between softmaxes of similarities
to a queue of anchors.

``p_t = softmax(t · A_t^T / T_t)``, ``p_s = softmax(s · A_s^T / T_s)``, loss = Σ_anchors p_t (log p_t − log p_s),
averaged over the batch (``kl_div(log_softmax(s), softmax(t), reduction="batchmean")``). Both embeddings are
L2-normalised here; anchors are used as stored (the queue holds normalised embeddings once it has filled).
Similarities are computed against the queue *before* the current batch is enqueued, so a sample never scores
against itself. The arithmetic runs in float32 even under autocast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def queue_similarities(emb: torch.Tensor, anchors: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits ``normalize(emb) @ anchors.T / temperature`` as float32, shape (batch, queue).

    Never makes a queue-sized copy: a float32 queue is used as it is; a half-precision queue (``queue_dtype``)
    is multiplied in its own dtype and only the batch × queue logits are converted to float32.
    """
    emb = F.normalize(emb.float(), dim=1)
    if anchors.dtype != torch.float32:
        return (emb.to(anchors.dtype) @ anchors.t()).float() / temperature
    return emb @ anchors.t() / temperature


def compress_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_anchors: torch.Tensor,
    teacher_anchors: torch.Tensor,
    temperature: float = 0.04,
    student_temperature: float | None = None,
) -> torch.Tensor:
    """KL(p_teacher ‖ p_student), summed over anchors and averaged over the batch."""
    with torch.autocast(device_type=student.device.type, enabled=False):
        t_logits = queue_similarities(teacher, teacher_anchors, temperature)
        s_logits = queue_similarities(student, student_anchors, student_temperature or temperature)
        return F.kl_div(F.log_softmax(s_logits, dim=1), F.softmax(t_logits, dim=1), reduction="batchmean")


class CompReSSLoss(nn.Module):
    def __init__(self, temperature: float = 0.04, student_temperature: float | None = None):
        super().__init__()
        if temperature <= 0 or (student_temperature is not None and student_temperature <= 0):
            raise ValueError("temperatures must be > 0")
        self.temperature = temperature
        self.student_temperature = student_temperature

    def forward(self, student, teacher, student_anchors, teacher_anchors) -> torch.Tensor:
        return compress_loss(student, teacher, student_anchors, teacher_anchors,
                             self.temperature, self.student_temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, student_temperature={self.student_temperature}"
