"""The distillation base: a LightningModule that owns the frozen teacher, the student and the optimiser.

Subclasses (CompReSS 2q / 1q, and the baselines) implement ``distill(x, student_emb, teacher_emb, *, labels,
index)`` returning ``(loss, logs)`` and, if they train extra layers, list them in ``extra_modules``. ``labels`` and
``index`` are the batch's class labels and dataset indices (keyword-only, ``None`` when a caller has none); a
method that learns without the teacher (the supervised and cluster-classification baselines) sets
``needs_teacher = False`` and receives ``teacher_emb=None``: the teacher is never run. Everything else — the teacher
forward under no-grad, keeping the teacher frozen and in eval mode, gathering across processes, the optimiser and
schedule, keeping the teacher's weights out of checkpoints (they come from the teacher's own file) — is here.

``train_head_dim``: a linear layer from the student's embedding to ``train_head_dim`` that exists only in
training (docs/paper.md: the ResNet-50 student's 2048→8192 layer). Every method then sees the head's output as the
student embedding (``student_dim`` is the head's width); evaluation, export and ``forward`` use the backbone
alone, and the checkpoint keeps the head under ``train_head.*`` (evaluation loads only ``student.*``).
"""
from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from .anchor_queue import AnchorQueue
from ..runtime.nonfinite import LossWatch
from ..runtime.config import ConfigError
from ..runtime.distributed import all_gather_cat
from ..runtime.resume import collect_rng_states, restore_rng_states
from .schedule import build_optimizer

log = logging.getLogger(__name__)


class DistillationModule(pl.LightningModule):
    #: False: ``training_step`` never runs the teacher and passes ``teacher_emb=None`` to ``distill``
    needs_teacher: bool = True

    def __init__(self, student: nn.Module, teacher: nn.Module, optim: Any, config: dict | None = None,
                 train_head_dim: int | None = None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.optim_cfg = optim
        self.save_hyperparameters({"config": config or {}})
        self.channels_last = False  # set by `use_channels_last()`
        if train_head_dim is not None and int(train_head_dim) <= 0:
            raise ValueError(f"student.train_head_dim must be a positive width or null, got {train_head_dim}")
        self.train_head = nn.Linear(int(student.embed_dim), int(train_head_dim)) if train_head_dim else None
        self.student_dim = int(train_head_dim) if train_head_dim else int(student.embed_dim)
        self.teacher_dim = int(teacher.embed_dim)
        self.loss_watch = LossWatch()  # non-finite losses, checked without a per-step host synchronisation

    # ---- pieces subclasses provide ---------------------------------------------------------------------------
    def distill(self, x: torch.Tensor, student_emb: torch.Tensor, teacher_emb: torch.Tensor | None, *,
                labels: torch.Tensor | None = None, index: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch. ``labels``/``index``: the batch's class labels and dataset indices."""
        raise NotImplementedError

    def extra_modules(self) -> list[nn.Module]:
        """Trainable modules besides the student backbone (e.g. the 1q projection); dropped at evaluation."""
        return []

    # ---- shared machinery ------------------------------------------------------------------------------------
    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate ``t`` from every process in rank order (identity on one process)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return t
        return all_gather_cat(t)  # torch.distributed.all_gather_into_tensor (distributed.py)

    def teacher_targets(self, x: torch.Tensor, index: torch.Tensor, view: torch.Tensor | None = None
                        ) -> torch.Tensor:
        # inference mode: no autograd bookkeeping at all for the frozen teacher; the clone (batch-sized, outside
        # inference mode) makes the targets ordinary tensors that the loss may save for its backward
        with torch.inference_mode():
            t = self.teacher(x).float()
        return t.clone()

    @property
    def reads_cached_teacher(self) -> bool:
        return self.needs_teacher and bool(getattr(self.teacher, "is_cached", False))

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # A cached teacher (teachers.cache.CachedFeatures) is a table on the host: its rows are looked up here, by
        # the batch's dataset indices while they are still host tensors, and travel to the device with the batch
        # (appended as its last element). Looking them up in the step would copy the indices back from the GPU:
        # a host synchronisation every step.
        if self.reads_cached_teacher:
            x, labels, index, *view = batch
            batch = [x, labels, index, *view, self.teacher.lookup(index, *view)]
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.channels_last and isinstance(batch, (list, tuple)) and torch.is_tensor(batch[0]) \
                and batch[0].dim() == 4:
            batch = [batch[0].contiguous(memory_format=torch.channels_last), *batch[1:]]
        return batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The student's embedding: what every evaluation uses (no projection head, no training head)."""
        return self.student(x)

    def training_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The student's embedding in training: the backbone, then the training head when there is one."""
        e = self.student(x)
        return self.train_head(e) if self.train_head is not None else e

    def training_step(self, batch, batch_idx):
        self.loss_watch.poll()  # earlier steps' non-finite checks whose flags have arrived (never waits)
        teacher_emb = None
        if self.reads_cached_teacher:  # its rows were looked up before the transfer: the batch's last element
            *batch, teacher_emb = batch
        x, labels, index, *view = batch  # a 4th element: the view k of a cached K-view teacher (SeededViews)
        if self.needs_teacher and teacher_emb is None:
            teacher_emb = self.teacher_targets(x, index, *view)
        student_emb = self.training_embedding(x)
        loss, logs = self.distill(x, student_emb, teacher_emb, labels=labels, index=index)
        self.loss_watch.push(loss, f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})")
        n = (x[0] if isinstance(x, (list, tuple)) else x).shape[0]  # a list: the views of a multi-view method
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        for k, v in logs.items():
            self.log(f"train/{k}", v, on_step=True, on_epoch=False, batch_size=n)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # the step's backward is done: now the queues may be written (see AnchorQueue.stage)
        for m in self.modules():
            if isinstance(m, AnchorQueue):
                m.flush()

    def on_train_epoch_end(self) -> None:
        self.loss_watch.settle()  # before the epoch's checkpoint is written (ModelCheckpoint runs after this hook)

    def on_train_end(self) -> None:
        self.loss_watch.settle()

    def on_train_epoch_start(self) -> None:
        self.teacher.eval()  # Lightning's model.train() must never put the teacher's BatchNorm in train mode
        self.teacher.assert_frozen()
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=False, on_epoch=True)

    def parameter_groups(self) -> list[dict]:
        params = list(self.student.parameters())
        for m in [*([self.train_head] if self.train_head is not None else []), *self.extra_modules()]:
            params += list(m.parameters())
        return [{"name": "student", "params": params}]

    def configure_optimizers(self):
        return build_optimizer(self.parameter_groups(), self.optim_cfg, model=self)

    def use_channels_last(self) -> "DistillationModule":
        """NHWC memory layout for every network and every input batch (faster convolutions on GPUs)."""
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)

    # ---- checkpoints: the teacher's weights stay in the teacher's own file -----------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith("teacher.")]:
            del sd[k]
        checkpoint["teacher_fingerprint"] = self.teacher.fingerprint()
        checkpoint["rng_states"] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("teacher_fingerprint")
        mine = self.teacher.fingerprint()
        if saved is not None and saved != mine:
            raise ConfigError(
                f"this checkpoint was trained with another teacher (fingerprint {saved}, current teacher {mine}); "
                "resume with the teacher the run started with")
        sd = checkpoint["state_dict"]
        for k, v in self.teacher.state_dict(prefix="teacher.").items():
            sd.setdefault(k, v)
        restore_rng_states(checkpoint.get("rng_states"))


def l2n(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t.float(), dim=1)
