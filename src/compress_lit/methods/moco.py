"""MoCo v2 pretraining: the demo's teacher, and the "MoCo from scratch" baseline on the student architecture.

Query encoder = backbone + MLP projector; key encoder = EMA copy of both; InfoNCE of each query against its
key (positive) and a queue of past keys (negatives), temperature 0.2 by default.

BatchNorm lets a contrastive model "cheat": keys of the current batch share batch statistics with their queries,
keys in the queue do not, so the positive can be told apart by its statistics rather than its content. MoCo
counters this with shuffling BN across GPUs; ``bn_splits > 1`` does the same on one device: queries are encoded in
``bn_splits`` groups of consecutive samples and keys in ``bn_splits`` groups of a random permutation, so a query
and its key never share their BatchNorm statistics by construction. Under DDP leave it at 1 or combine freely. The backbone is stored under
``backbone.`` in checkpoints, which is what the teacher loader's ``compress_lit`` format reads.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ..momentum import ema_update, make_momentum_copy
from ..anchor_queue import AnchorQueue
from ..resume import collect_rng_states, restore_rng_states
from ..schedule import build_optimizer


def mlp_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of the positive (column 0) among [q·k, q·negatives] / T; q, k normalised, fp32."""
    q, k = q.float(), k.float()
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ negatives.float().t()
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class MoCoV2(pl.LightningModule):
    def __init__(self, backbone: nn.Module, optim, *, queue_size: int = 4096, temperature: float = 0.2,
                 momentum: float = 0.99, proj_hidden_dim: int = 512, proj_dim: int = 128,
                 bn_splits: int = 1, config: dict | None = None):
        super().__init__()
        self.save_hyperparameters({"config": config or {}})
        self.backbone = backbone
        self.projector = mlp_projector(backbone.embed_dim, proj_hidden_dim, proj_dim)
        self.backbone_momentum = make_momentum_copy(backbone)
        self.projector_momentum = make_momentum_copy(self.projector)
        self.queue = AnchorQueue(queue_size, {"keys": proj_dim})
        with torch.no_grad():  # MoCo starts from normalised random keys
            self.queue.bank("keys").copy_(F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.temperature = temperature
        self.momentum = momentum
        self.bn_splits = bn_splits
        self.optim_cfg = optim
        self._last_ema_step = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return t
        return self.all_gather(t.contiguous()).flatten(0, 1)

    def encode_query(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.chunk(self.bn_splits) if self.bn_splits > 1 else (x,)
        return F.normalize(torch.cat([self.projector(self.backbone(c)) for c in chunks]), dim=1)

    @torch.no_grad()
    def encode_key(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn_splits <= 1:
            return F.normalize(self.projector_momentum(self.backbone_momentum(x)), dim=1)
        perm = torch.randperm(x.shape[0], device=x.device)
        k = torch.cat([self.projector_momentum(self.backbone_momentum(c)) for c in x[perm].chunk(self.bn_splits)])
        return F.normalize(k[torch.argsort(perm)], dim=1)

    def training_step(self, batch, batch_idx):
        (x1, x2), _, _ = batch
        q = self.encode_query(x1)
        k = self.encode_key(x2)
        loss = info_nce(q, k, self.queue.bank("keys"), self.temperature)
        self.queue.stage(keys=self.gather(k))  # written after the backward pass
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at global step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x1.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.queue.flush()
        if self.global_step > self._last_ema_step:
            ema_update(self.backbone_momentum, self.backbone, self.momentum)
            ema_update(self.projector_momentum, self.projector, self.momentum)
            self._last_ema_step = self.global_step

    def on_train_epoch_start(self) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_rng_states(checkpoint.get("rng_states"))

    def configure_optimizers(self):
        params = list(self.backbone.parameters()) + list(self.projector.parameters())
        return build_optimizer([{"name": "backbone", "params": params}], self.optim_cfg)
