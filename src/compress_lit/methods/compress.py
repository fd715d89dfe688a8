"""CompReSS: 2q (with or without a momentum student) and 1q, as one small subclass of the distillation base.

* **2q**: a teacher queue of teacher embeddings and a student queue of student embeddings, written together.
  With ``use_momentum_encoder`` the student keys come from an EMA copy of the student (m = 0.999, BatchNorm in
  train mode) run on the same augmented batch; without it, from the student's own detached embeddings.
* **1q**: one queue of teacher embeddings; a linear layer maps the student into teacher space and its
  similarities use the teacher queue. The layer is dropped at evaluation (``forward`` returns the backbone's
  embedding).
"""
from __future__ import annotations

import torch
from torch import nn

from ..losses.compress import compress_loss
from .momentum import ema_update, make_momentum_copy
from .anchor_queue import AnchorQueue
from .distill import DistillationModule, l2n


class CompReSS(DistillationModule):
    def __init__(self, student: nn.Module, teacher: nn.Module, optim, *, queue_size: int = 128_000,
                 temperature: float = 0.04, student_temperature: float | None = None, momentum: float = 0.999,
                 use_momentum_encoder: bool = True, one_queue: bool = False, queue_dtype: str = "float32",
                 config: dict | None = None, train_head_dim: int | None = None):
        super().__init__(student, teacher, optim, config, train_head_dim)
        if one_queue and use_momentum_encoder:
            raise ValueError("1q has no student queue, so no momentum encoder")
        self.temperature = temperature
        self.student_temperature = student_temperature
        self.momentum = momentum
        self.one_queue = one_queue
        self.use_momentum_encoder = use_momentum_encoder
        if one_queue:
            self.projection = nn.Linear(self.student_dim, self.teacher_dim)
            banks = {"teacher": self.teacher_dim}
        else:
            banks = {"teacher": self.teacher_dim, "student": self.student_dim}
        self.queues = AnchorQueue(queue_size, banks, dtype=queue_dtype)
        self.student_momentum = make_momentum_copy(student) if use_momentum_encoder else None
        # the training head's momentum copy: the student queue holds keys in the head's space
        self.train_head_momentum = (make_momentum_copy(self.train_head)
                                    if use_momentum_encoder and self.train_head is not None else None)
        self._last_ema_step = -1

    def extra_modules(self):
        return [self.projection] if self.one_queue else []

    def distill(self, x, student_emb, teacher_emb, *, labels=None, index=None):
        q = self.queues
        if self.one_queue:
            student_emb = self.projection(student_emb)
            loss = compress_loss(student_emb, teacher_emb, q.bank("teacher"), q.bank("teacher"),
                                 self.temperature, self.student_temperature)
            q.stage(teacher=self.gather(l2n(teacher_emb)))
        else:
            loss = compress_loss(student_emb, teacher_emb, q.bank("student"), q.bank("teacher"),
                                 self.temperature, self.student_temperature)
            if self.student_momentum is not None:
                with torch.no_grad():
                    keys = self.student_momentum(x)
                    if self.train_head_momentum is not None:
                        keys = self.train_head_momentum(keys)
            else:
                keys = student_emb.detach()
            q.stage(teacher=self.gather(l2n(teacher_emb)), student=self.gather(l2n(keys)))
        return loss, {"queue_filled": q.num_enqueued.clamp(max=q.size).float() / q.size}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)  # enqueue this step's keys
        # EMA once per optimiser step (correct under gradient accumulation)
        if self.student_momentum is not None and self.global_step > self._last_ema_step:
            ema_update(self.student_momentum, self.student, self.momentum)
            if self.train_head_momentum is not None:
                ema_update(self.train_head_momentum, self.train_head, self.momentum)
            self._last_ema_step = self.global_step
