"""MoCo v2 pretraining: the demo's teacher, and the "MoCo from scratch" baseline on the student architecture.

Query encoder = backbone + MLP projector; key encoder = EMA copy of both; InfoNCE of each query against its
key (positive) and a queue of past keys (negatives), temperature 0.2 by default.

Shuffled BatchNorm. BatchNorm lets a contrastive model "cheat": if a query and its key are normalised with the
statistics of the same batch while the queue's keys are not, the positive can be told apart by those statistics
rather than by its content. MoCo therefore shuffles the key batch across GPUs. Here (``shuffle_bn``, on by default):

* under DDP, as MoCo's batch shuffle: every process gathers the key images of all processes, process 0 draws a
  permutation of the global batch and broadcasts it, each process encodes its slice of the shuffled batch, the
  keys are gathered back and each process takes the keys of its own samples (un-shuffled). A query is normalised
  with its process's batch, its key with a random mix of the global batch;
* on each device, the queries are encoded in ``bn_splits`` BatchNorm groups of consecutive samples, the keys in
  ``bn_splits`` groups of a random permutation of the (already shuffled, under DDP) local batch: on one device
  this is what gives a key a batch composition different from its query's.

``bn_splits=None`` (auto, :func:`auto_bn_splits`): 1 under DDP (MoCo's per-GPU BatchNorm); on one device
``batch // 32`` groups (MoCo's 32 images per GPU at batch 256 on 8 GPUs), at least 2, at most ``batch // 2`` so
that every group holds 2+ samples. One group on one device (``bn_splits=1``, or a batch under 4) is plain,
leaky BatchNorm, as is ``shuffle_bn=False`` (the keys then use the queries' groups). The backbone is stored
under ``backbone.`` in checkpoints, which is what the teacher loader's ``compress_lit`` format reads.
"""
from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.distributed import all_gather_cat
from .momentum import ema_update, make_momentum_copy
from .anchor_queue import AnchorQueue
from ..runtime.nonfinite import LossWatch
from ..runtime.resume import collect_rng_states, restore_rng_states
from .schedule import build_optimizer

log = logging.getLogger(__name__)

#: MoCo's per-GPU batch (256 images on 8 GPUs): the size of an automatic BatchNorm group on one device
MOCO_BN_GROUP = 32


def mlp_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of the positive (column 0) among [q·k, q·negatives] / T; q, k normalised, fp32."""
    q, k = q.float(), k.float()
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ negatives.float().t()
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def auto_bn_splits(batch: int, world_size: int) -> int:
    """BatchNorm groups per device when ``bn_splits`` is automatic (see the module docstring)."""
    if world_size > 1:
        return 1
    return max(1, min(max(2, batch // MOCO_BN_GROUP), batch // 2))


def encode_in_groups(encoder, x: torch.Tensor, groups: int) -> torch.Tensor:
    """``encoder`` applied to ``groups`` consecutive slices of ``x`` (sizes differing by at most 1), concatenated:
    each slice is its own BatchNorm batch."""
    if groups <= 1:
        return encoder(x)
    return torch.cat([encoder(c) for c in x.tensor_split(min(groups, x.shape[0]))])


class MoCoV2(pl.LightningModule):
    def __init__(self, backbone: nn.Module, optim, *, queue_size: int = 4096, temperature: float = 0.2,
                 momentum: float = 0.99, proj_hidden_dim: int | None = 512, proj_dim: int = 128,
                 shuffle_bn: bool = True, bn_splits: int | None = None, config: dict | None = None):
        super().__init__()
        if bn_splits is not None and bn_splits < 1:
            raise ValueError(f"bn_splits must be >= 1 or None (auto), got {bn_splits}")
        self.save_hyperparameters({"config": config or {}})
        self.backbone = backbone
        self.projector = mlp_projector(backbone.embed_dim, proj_hidden_dim or backbone.embed_dim, proj_dim)
        self.backbone_momentum = make_momentum_copy(backbone)
        self.projector_momentum = make_momentum_copy(self.projector)
        self.queue = AnchorQueue(queue_size, {"keys": proj_dim})
        with torch.no_grad():  # MoCo starts from normalised random keys
            self.queue.bank("keys").copy_(F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.temperature = temperature
        self.momentum = momentum
        self.shuffle_bn = bool(shuffle_bn)
        self.bn_splits = bn_splits
        self.optim_cfg = optim
        self._last_ema_step = -1
        self.loss_watch = LossWatch()  # non-finite losses, checked without a per-step host synchronisation
        self._warned_leak = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    # ---- encoders ----------------------------------------------------------------------------------------------
    def world_size(self) -> int:
        trainer = self._trainer
        return 1 if trainer is None else int(trainer.world_size)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate ``t`` from every process in rank order (identity on one process)."""
        if self.world_size() == 1:
            return t
        return all_gather_cat(t)  # torch.distributed.all_gather_into_tensor (distributed.py)

    def bn_groups(self, batch: int) -> int:
        """BatchNorm groups per device for a local batch of ``batch`` samples."""
        groups = self.bn_splits if self.bn_splits is not None else auto_bn_splits(batch, self.world_size())
        if groups > 1 and batch < 2 * groups:
            raise ValueError(f"method.bn_splits={groups} needs 2+ samples per BatchNorm group, but this process has "
                             f"a batch of {batch}")
        return groups

    def query_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def key_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector_momentum(self.backbone_momentum(x))

    def encode_query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(encode_in_groups(self.query_embedding, x, self.bn_groups(x.shape[0])), dim=1)

    @torch.no_grad()
    def encode_key(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised keys of the local batch ``x`` (in its order) and of the global batch (rank order, for the
        queue; the same tensor on one process)."""
        groups, world = self.bn_groups(x.shape[0]), self.world_size()
        if not self._warned_leak and (not self.shuffle_bn or (world == 1 and groups == 1)):
            log.warning("MoCo: keys are normalised with their queries' BatchNorm batches (method.shuffle_bn=false, "
                        "or one group on one device: method.bn_splits=1 or a batch under 4), which the contrastive "
                        "task can exploit")
            self._warned_leak = True
        if not self.shuffle_bn:
            k = F.normalize(encode_in_groups(self.key_embedding, x, groups), dim=1)
            return k, self.gather(k)
        if world == 1:
            if groups == 1:
                k = self.key_embedding(x)
            else:
                perm = torch.randperm(x.shape[0], device=x.device)
                k = encode_in_groups(self.key_embedding, x[perm], groups)[torch.argsort(perm)]
            k = F.normalize(k, dim=1)
            return k, k
        # MoCo's batch shuffle across processes (equal local batches: the loader drops the last partial one)
        b = x.shape[0]
        x_all = self.gather(x)
        perm = torch.randperm(x_all.shape[0], device=x.device)
        torch.distributed.broadcast(perm, src=0)  # every process uses process 0's permutation
        rank = self.global_rank
        k_shuffled = self.gather(encode_in_groups(self.key_embedding, x_all[perm.view(world, b)[rank]], groups))
        k_all = torch.empty_like(k_shuffled)
        k_all[perm] = k_shuffled  # row j of the shuffled batch is sample perm[j]
        k_all = F.normalize(k_all, dim=1)
        return k_all[rank * b:(rank + 1) * b], k_all

    # ---- training ----------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        self.loss_watch.poll()  # earlier steps' non-finite checks whose flags have arrived (never waits)
        (x1, x2), _, _ = batch
        q = self.encode_query(x1)
        k, k_global = self.encode_key(x2)
        loss = info_nce(q, k, self.queue.bank("keys"), self.temperature)
        self.queue.stage(keys=k_global)  # written after the backward pass
        self.loss_watch.push(loss, f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x1.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.queue.flush()
        if self.global_step > self._last_ema_step:
            ema_update(self.backbone_momentum, self.backbone, self.momentum)
            ema_update(self.projector_momentum, self.projector, self.momentum)
            self._last_ema_step = self.global_step

    def on_train_epoch_end(self) -> None:
        self.loss_watch.settle()  # before the epoch's checkpoint is written

    def on_train_end(self) -> None:
        self.loss_watch.settle()

    def on_train_epoch_start(self) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_rng_states(checkpoint.get("rng_states"))

    def configure_optimizers(self):
        params = list(self.backbone.parameters()) + list(self.projector.parameters())
        return build_optimizer([{"name": "backbone", "params": params}], self.optim_cfg, model=self)
