"""DisCo (Gao et al., ECCV 2022) as a small subclass of the distillation base: the student learns with its own MoCo v2
objective while its final embedding is held to the teacher's, on both augmented views of each image
(:func:`compress_lit.losses.disco.disco_loss`).

Training batches hold two views ``[x1, x2]`` (training/run.py builds the datamodule with ``views=2`` for this method). The
query encoder is the student (+ training head) and an MLP projector (Linear d→hidden, ReLU, Linear hidden→teacher
width; MoCo v2's ``mlp_projector``); the key encoder is an EMA copy of both (``momentum``), run on view 2 with its
BatchNorm groups drawn from a random permutation of the batch, so that a key is never normalised with its query's
batch (MoCo's shuffled BatchNorm in its one-device form, used on each process: ``bn_splits`` groups, automatically
``batch // 32``, at least 2, at most ``batch // 2``; the queries use the same number of consecutive groups). The
teacher embeds both views. Queue, projector and momentum encoder are dropped at evaluation.

Defaults, from the official commands (Reproduction.md and ``DisCo/main.py`` of github.com/Yuting-Gao/DisCo-pytorch;
the optimiser's are in the ``family/disco_*`` presets): queue 65,536 (``--moco-k``), T 0.2 (``--moco-t 0.2``),
momentum 0.999 (``--moco-m``), consistency weight 32 (``loss = 1.0 * loss + 1.0 * mse_loss + 1.0 * mse_loss_qk``
with ``nn.MSELoss(reduction='sum')`` over each GPU's 32 images against a mean-reduced InfoNCE: 32x our per-sample
mean, :mod:`compress_lit.losses.disco`), projector hidden width 2,048 (``builder_kq_mse_largeembedding_2048.py``: the
paper's enlarged hidden layer against the "distilling bottleneck").

The teacher's BatchNorm (``teacher_bn``): ``eval`` (default: the teacher as every method of this library runs it and
as the evaluations score it: running statistics) or ``batch``, the official code's, whose teacher is never put in
eval mode and normalises each view with the statistics of its GPU's 32 images. ``batch`` runs the teacher on each
view in the BatchNorm groups of the queries (``bn_splits``: groups of 32 on one device) with batch statistics that
update nothing (:func:`compress_lit.teachers.batch_stats.batch_statistics`): the teacher stays frozen and its stored
running statistics unchanged. The ``family/disco_*`` presets set ``batch``.

One difference: DisCo distils the teacher's 128-d MoCo projection output; here, as for every method of this library,
the teacher's embedding is its backbone feature (docs/paper.md), so the projector maps to its width and the MoCo
queue holds keys of that width.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .anchor_queue import AnchorQueue
from ..losses.disco import DISCO_WEIGHT, disco_loss
from .momentum import ema_update, make_momentum_copy
from ..teachers.batch_stats import batch_norms, batch_statistics
from .distill import DistillationModule
from .moco import auto_bn_splits, encode_in_groups, mlp_projector

log = logging.getLogger(__name__)

#: ``method.disco_teacher_bn``: the teacher's BatchNorm statistics (running: ``eval``; each group's own: ``batch``)
TEACHER_BN = ("eval", "batch")

class DisCo(DistillationModule):
    #: images per training sample: training/run.py builds the datamodule with this many augmented views
    train_views = 2

    def __init__(self, student: nn.Module, teacher: nn.Module, optim, *, queue_size: int = 65_536,
                 temperature: float = 0.2, momentum: float = 0.999, weight: float = DISCO_WEIGHT,
                 hidden_dim: int = 2048, bn_splits: int | None = None, teacher_bn: str = "eval",
                 queue_dtype: str = "float32", config: dict | None = None, train_head_dim: int | None = None):
        super().__init__(student, teacher, optim, config, train_head_dim)
        if getattr(teacher, "is_cached", False):
            raise ValueError("DisCo runs the teacher on both augmented views: it does not support a cached teacher")
        if bn_splits is not None and bn_splits < 1:
            raise ValueError(f"bn_splits must be >= 1 or None (auto), got {bn_splits}")
        self.temperature, self.momentum, self.weight = float(temperature), float(momentum), float(weight)
        if teacher_bn not in TEACHER_BN:
            raise ValueError(f"teacher_bn must be one of {list(TEACHER_BN)}, got {teacher_bn!r}")
        self.bn_splits, self.teacher_bn = bn_splits, teacher_bn
        if teacher_bn == "batch" and not batch_norms(teacher):
            log.warning("method.disco_teacher_bn=batch: the teacher has no BatchNorm layer, so it computes exactly as "
                        "with disco_teacher_bn=eval")
        self.projector = mlp_projector(self.student_dim, hidden_dim, self.teacher_dim)
        self.student_momentum = make_momentum_copy(student)
        self.train_head_momentum = make_momentum_copy(self.train_head) if self.train_head is not None else None
        self.projector_momentum = make_momentum_copy(self.projector)
        self.queue = AnchorQueue(queue_size, {"keys": self.teacher_dim}, dtype=queue_dtype)
        with torch.no_grad():  # MoCo starts from normalised random keys
            bank = self.queue.bank("keys")
            bank.copy_(F.normalize(torch.randn(bank.shape), dim=1).to(bank.dtype))
        self._last_ema_step = -1

    def extra_modules(self):
        return [self.projector]

    # ---- two views -----------------------------------------------------------------------------------------
    @staticmethod
    def views(x) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, (list, tuple)) or len(x) != 2:
            raise ValueError("DisCo trains on two augmented views of each image: a batch [x1, x2] (a datamodule "
                             "built with views=2)")
        return x[0], x[1]

    def bn_groups(self, batch: int) -> int:
        groups = self.bn_splits if self.bn_splits is not None else auto_bn_splits(batch, 1)
        if groups > 1 and batch < 2 * groups:
            raise ValueError(f"method.disco_bn_splits={groups} needs 2+ samples per BatchNorm group, but this "
                             f"process has a batch of {batch}")
        return groups

    def teacher_targets(self, x, index, view=None) -> torch.Tensor:
        """The teacher's embeddings of view 1, then of view 2."""
        x1, x2 = self.views(x)
        if self.teacher_bn == "eval":  # running statistics: both views in one forward
            return super().teacher_targets(torch.cat([x1, x2]), index)
        # the official teacher: each view normalised with the batch statistics of its group (a GPU's 32 images)
        groups = self.bn_groups(x1.shape[0])
        with torch.inference_mode(), batch_statistics(self.teacher):
            t = torch.cat([encode_in_groups(self.teacher, v, groups) for v in (x1, x2)]).float()
        return t.clone()

    def training_embedding(self, x) -> torch.Tensor:
        """The student's embeddings of view 1, then of view 2 (each view its own BatchNorm groups)."""
        x1, x2 = self.views(x)
        embed, groups = super().training_embedding, self.bn_groups(x1.shape[0])
        return torch.cat([encode_in_groups(embed, x1, groups), encode_in_groups(embed, x2, groups)])

    def key_embedding(self, x: torch.Tensor) -> torch.Tensor:
        e = self.student_momentum(x)
        if self.train_head_momentum is not None:
            e = self.train_head_momentum(e)
        return self.projector_momentum(e)

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised keys of ``x`` (in its order), encoded in BatchNorm groups of a random permutation."""
        perm = torch.randperm(x.shape[0], device=x.device)
        k = encode_in_groups(self.key_embedding, x[perm], self.bn_groups(x.shape[0]))[torch.argsort(perm)]
        return F.normalize(k.float(), dim=1)

    # ---- loss ----------------------------------------------------------------------------------------------
    def distill(self, x, student_emb, teacher_emb, *, labels=None, index=None):
        x1, x2 = self.views(x)
        b = x1.shape[0]
        q = self.projector(student_emb)
        k = self.encode_keys(x2)
        loss, contrastive, consistency = disco_loss(q[:b], q[b:], k, self.queue.bank("keys"), teacher_emb[:b],
                                                    teacher_emb[b:], self.temperature, self.weight)
        self.queue.stage(keys=self.gather(k))  # enqueued after the backward pass
        return loss, {"contrastive": contrastive.detach(), "consistency": consistency.detach()}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)  # enqueue this step's keys
        if self.global_step > self._last_ema_step:  # once per optimiser step (gradient accumulation)
            ema_update(self.student_momentum, self.student, self.momentum)
            if self.train_head_momentum is not None:
                ema_update(self.train_head_momentum, self.train_head, self.momentum)
            ema_update(self.projector_momentum, self.projector, self.momentum)
            self._last_ema_step = self.global_step
