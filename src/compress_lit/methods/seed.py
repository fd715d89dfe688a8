"""SEED (Fang et al., ICLR 2021) as a small subclass of the distillation base.

The student's embedding goes through an MLP head (Linear d→d, ReLU, Linear d→teacher width; the official
``seed/builder.py`` with ``--student_mlp``) and the loss (:func:`compress_lit.losses.seed.seed_loss`) asks it to
predict the teacher's softmax over the image's own teacher embedding and a queue of past teacher embeddings. The
queue (an :class:`AnchorQueue` with one ``teacher`` bank) starts as normalised Gaussian vectors, as the official
code's, and is written after the backward pass. The head is dropped at evaluation.

Defaults, from the official script's arguments (``tools/opts.py`` of github.com/jacobswan1/SEED; the optimiser's
are in the ``family/seed_*`` presets): queue 65,536 (``--queue``), student temperature 0.2 (``--temp``), teacher
temperature 1e-4 (``--distill-t``).

One difference: SEED distils the teacher's 128-d MoCo projection output; here, as for every method of this
library, the teacher's embedding is its backbone feature (docs/paper.md), so the head maps to its width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .anchor_queue import AnchorQueue
from ..losses.seed import seed_loss
from .distill import DistillationModule, l2n
from .moco import mlp_projector


class SEED(DistillationModule):
    def __init__(self, student: nn.Module, teacher: nn.Module, optim, *, queue_size: int = 65_536,
                 student_temperature: float = 0.2, teacher_temperature: float = 1e-4,
                 hidden_dim: int | None = None, queue_dtype: str = "float32", config: dict | None = None,
                 train_head_dim: int | None = None):
        super().__init__(student, teacher, optim, config, train_head_dim)
        if student_temperature <= 0 or teacher_temperature <= 0:
            raise ValueError("SEED's temperatures must be > 0")
        self.student_temperature = float(student_temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.head = mlp_projector(self.student_dim, hidden_dim or self.student_dim, self.teacher_dim)
        self.queue = AnchorQueue(queue_size, {"teacher": self.teacher_dim}, dtype=queue_dtype)
        with torch.no_grad():
            bank = self.queue.bank("teacher")
            bank.copy_(F.normalize(torch.randn(bank.shape), dim=1).to(bank.dtype))

    def extra_modules(self):
        return [self.head]

    def distill(self, x, student_emb, teacher_emb, *, labels=None, index=None):
        loss = seed_loss(self.head(student_emb), teacher_emb, self.queue.bank("teacher"),
                         self.student_temperature, self.teacher_temperature)
        self.queue.stage(teacher=self.gather(l2n(teacher_emb)))  # enqueued after the backward pass
        q = self.queue
        return loss, {"queue_filled": q.num_enqueued.clamp(max=q.size).float() / q.size}
