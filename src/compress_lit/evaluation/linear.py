"""The paper's linear probe on a frozen backbone.

Head: L2-normalise -> fixed per-dimension standardisation ``(x - mean) / std`` with the mean/std of the
L2-normalised **centre-crop train** features (computed once, before training, never from val), where
``std = sqrt(var + 1e-5)`` as in the official evaluation script -> ``Linear``. SGD lr 0.01, momentum 0.9, weight decay 1e-4, batch 256, 40 epochs, lr
x0.1 at epochs 15 and 30 (all in :class:`~compress_lit.evaluation.settings.LinearProbeConfig`).

* :class:`LinearProbe`: a LightningModule over the frozen backbone (kept in eval mode, no gradients), trained on
  the datamodule's augmented ``train_dataloader`` (RandomResizedCrop + flip), validated on the centre-crop
  ``val_dataloader`` every epoch. The reported number is the **final** epoch's top-1; the best epoch is kept too,
  labelled "best (not the reported number)".
* :func:`linear_probe_on_features`: the same head and schedule on precomputed features (no augmentation): small
  data, tests, quick checks.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ..schedule import LRSchedule
from .features import layer_fn, merge_shards
from .settings import LinearProbeConfig

BEST_LABEL = "best (not the reported number)"


def _t(x, dtype=torch.float32) -> torch.Tensor:
    return (x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))).to(dtype)


def standardization_stats(train_feats, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and scale per dimension of the L2-normalised train features, as the official linear evaluation's
    fixed batch-norm layer has them: ``mean`` and ``sqrt(var + eps)`` with ``var`` the unbiased variance
    (``torch.var_mean``) and ``eps = 1e-5``. A dimension that never varies (a dead ReLU unit) is scaled by
    ``1/sqrt(eps)`` = 316, not blown up by ``1/std``."""
    z = F.normalize(_t(train_feats).flatten(1), dim=1).double()
    var, mean = torch.var_mean(z, dim=0)
    return mean.float(), torch.sqrt(var + eps).float()


class LinearHead(nn.Module):
    """L2-normalise -> (x - mean) / std with fixed buffers -> Linear."""

    def __init__(self, dim: int, num_classes: int, mean: Optional[torch.Tensor] = None,
                 std: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim) if mean is None else _t(mean).reshape(dim).clone())
        self.register_buffer("std", torch.ones(dim) if std is None else _t(std).reshape(dim).clone())
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(x.flatten(1).float(), dim=1)
        return self.fc((z - self.mean) / self.std)


def _schedule(cfg: LinearProbeConfig) -> LRSchedule:
    return LRSchedule(kind="multistep", epochs=int(cfg.epochs), milestones=list(cfg.milestones),
                      gamma=float(cfg.gamma))


def _optim_namespace(cfg: LinearProbeConfig):
    from types import SimpleNamespace

    return SimpleNamespace(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, epochs=cfg.epochs,
                           scheduler="multistep", milestones=list(cfg.milestones), gamma=cfg.gamma, warmup_epochs=0)


def _cfg(cfg: Optional[LinearProbeConfig], overrides: dict) -> LinearProbeConfig:
    from dataclasses import replace

    if cfg is None:
        cfg = LinearProbeConfig()
    elif not isinstance(cfg, LinearProbeConfig):  # a DictConfig / dict
        from omegaconf import OmegaConf

        d = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
        cfg = LinearProbeConfig(**d)
    return replace(cfg, **overrides) if overrides else cfg


def _topk_hits(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y[:, None]).any(1)


# ---------------------------------------------------------------------------------------------- fast path
@contextlib.contextmanager
def _single_thread_if_small(work: int, limit: int = 1 << 24) -> Iterator[None]:
    """Run tiny problems on one CPU thread: OpenMP barriers cost far more than such ops (>40x slower with 2
    threads on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    small = work < limit and n > 1
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(n)


def linear_probe_on_features(train_x, train_y, test_x, test_y, num_classes: Optional[int] = None,
                             cfg: Optional[LinearProbeConfig] = None, device: str | torch.device = "cpu",
                             **overrides: Any) -> dict[str, Any]:
    """Train the paper's head on precomputed features (no augmentation); top-1/top-5 (%) on ``test``.

    Returns ``{"top1", "top5" (classes > 5), "epochs", BEST_LABEL: {"top1", "epoch"}, "history": [top1 per epoch],
    "mean", "std"}``; the reported number is ``top1``, the final epoch's.
    """
    cfg = _cfg(cfg, overrides)
    tx, vx = _t(train_x).flatten(1), _t(test_x).flatten(1)
    ty, vy = _t(train_y, torch.long), _t(test_y, torch.long)
    num_classes = int(num_classes or int(max(ty.max(), vy.max())) + 1)
    small = torch.device(device).type == "cpu" and cfg.batch_size * tx.shape[1] * num_classes
    with _single_thread_if_small(int(small) if small else 1 << 62):
        return _probe_on_features(tx, ty, vx, vy, num_classes, cfg, device)


def _probe_on_features(tx, ty, vx, vy, num_classes: int, cfg: LinearProbeConfig, device) -> dict[str, Any]:
    mean, std = standardization_stats(tx)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = LinearHead(tx.shape[1], num_classes, mean, std).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    g = torch.Generator().manual_seed(cfg.seed)
    tx, ty, vx, vy = tx.to(device), ty.to(device), vx.to(device), vy.to(device)
    history, best, best_epoch, top5 = [], -1.0, -1, float("nan")
    for epoch in range(cfg.epochs):
        head.train()
        perm = torch.randperm(tx.shape[0], generator=g).to(device)
        for s in range(0, tx.shape[0], cfg.batch_size):
            idx = perm[s:s + cfg.batch_size]
            loss = F.cross_entropy(head(tx[idx]), ty[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        head.eval()
        with torch.no_grad():
            hit1 = hit5 = 0
            for s in range(0, vx.shape[0], 4096):
                logits = head(vx[s:s + 4096])
                hit1 += int(_topk_hits(logits, vy[s:s + 4096], 1).sum())
                hit5 += int(_topk_hits(logits, vy[s:s + 4096], 5).sum())
        top1 = 100.0 * hit1 / max(1, vx.shape[0])
        top5 = 100.0 * hit5 / max(1, vx.shape[0])
        history.append(top1)
        if top1 > best:
            best, best_epoch = top1, epoch + 1
    out: dict[str, Any] = {"top1": history[-1] if history else float("nan"), "epochs": cfg.epochs}
    if num_classes > 5:
        out["top5"] = top5
    out[BEST_LABEL] = {"top1": best, "epoch": best_epoch}
    out["history"] = history
    out["mean"], out["std"], out["head"] = mean, std, head.cpu()
    return out


# -------------------------------------------------------------------------------------------- Lightning
class LinearProbe(pl.LightningModule):
    """Linear head over a frozen backbone (any ``layer`` of ``backbone.layer_names``; ``None``: the embedding).

    ``mean``/``std``: :func:`standardization_stats` of the centre-crop train features of that layer.
    Logs ``train/loss``, ``val/top1``, ``val/top5`` per epoch; ``history`` holds the val top-1 of every epoch,
    ``final_top1`` the last, ``best_top1``/``best_epoch`` the best (not the reported number).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, mean: torch.Tensor, std: torch.Tensor,
                 cfg: Optional[LinearProbeConfig] = None, layer: Optional[str] = None):
        super().__init__()
        self.cfg = _cfg(cfg, {})
        self.backbone = backbone.requires_grad_(False).eval()
        self.layer = layer
        self._features: Callable = layer_fn(self.backbone, layer)
        dim = int(_t(mean).numel())
        self.head = LinearHead(dim, num_classes, mean, std)
        self.num_classes = num_classes
        self.history: list[float] = []
        self.history_top5: list[float] = []
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm keeps its running statistics, dropout off
        return self

    def on_train_epoch_start(self) -> None:
        self.backbone.eval()  # Lightning restores captured per-module modes; make sure the backbone stays frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone.training:
            self.backbone.eval()
        with torch.no_grad():
            f = self._features(x)
        return self.head(f)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch, batch_idx):
        x, y, idx = batch
        logits = self(x)
        self._val.append((idx.detach(), _topk_hits(logits, y, 1).detach(), _topk_hits(logits, y, 5).detach()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        idx = torch.cat([v[0] for v in self._val])
        h1 = torch.cat([v[1] for v in self._val]).float()
        h5 = torch.cat([v[2] for v in self._val]).float()
        self._val = []
        if self.trainer.world_size > 1:  # every process scored its shard: gather, drop the sampler's padding
            idx, h1, h5 = (self.all_gather(t).reshape(-1) for t in (idx, h1, h5))
            both, idx_u = merge_shards(torch.stack([h1, h5], 1), idx, idx)
            h1, h5 = both[:, 0], both[:, 1]
        top1, top5 = 100.0 * h1.mean().item(), 100.0 * h5.mean().item()
        self.log("val/top1", top1, prog_bar=True, sync_dist=False, rank_zero_only=True)
        if self.num_classes > 5:
            self.log("val/top5", top5, rank_zero_only=True)
        if not self.trainer.sanity_checking:
            self.history.append(top1)
            self.history_top5.append(top5)

    @property
    def final_top1(self) -> float:
        return self.history[-1] if self.history else float("nan")

    def results(self) -> dict[str, Any]:
        out: dict[str, Any] = {"top1": self.final_top1, "epochs": len(self.history)}
        if self.num_classes > 5 and self.history_top5:
            out["top5"] = self.history_top5[-1]
        if self.history:
            b = int(np.argmax(self.history))
            out[BEST_LABEL] = {"top1": self.history[b], "epoch": b + 1}
        out["history"] = list(self.history)
        return out

    def configure_optimizers(self):
        from ..schedule import build_optimizer

        return build_optimizer(self.head.parameters(), _optim_namespace(self.cfg))


def linear_datamodule_config(data_cfg, cfg: LinearProbeConfig):
    """The data config of the probe: ``batch_size`` from the probe config, optional ``crop_scale``."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(data_cfg, resolve=True) if not isinstance(data_cfg, dict) else dict(data_cfg)
    d["batch_size"] = int(cfg.batch_size)
    if cfg.crop_scale is not None:
        d["crop_scale"] = list(cfg.crop_scale)
    from ..config import DataConfig

    return OmegaConf.merge(OmegaConf.structured(DataConfig), d)


def run_linear_probe(backbone: nn.Module, data_cfg, cfg: Optional[LinearProbeConfig] = None,
                     layer: Optional[str] = None, train_feats=None, trainer_kwargs: Optional[dict] = None,
                     device: str | torch.device = "cpu", progress: bool = False, datamodule=None,
                     default_root_dir: Optional[str] = None) -> dict[str, Any]:
    """The full protocol: statistics from the centre-crop train features (``train_feats``, or extracted here),
    then Lightning training with the datamodule's augmentation, val every epoch; :meth:`LinearProbe.results`."""
    from ..data import build_datamodule
    from .features import extract_features

    cfg = _cfg(cfg, {})
    pl.seed_everything(cfg.seed, workers=True)
    dm = datamodule or build_datamodule(linear_datamodule_config(data_cfg, cfg))
    dm.setup("fit")
    if train_feats is None:
        train_feats, _ = extract_features(backbone, dm.train_eval_dataloader(), device, progress, layer=layer)
    mean, std = standardization_stats(train_feats)
    module = LinearProbe(backbone, dm.num_classes, mean, std, cfg, layer=layer)
    kwargs = {"max_epochs": cfg.epochs, "logger": False, "enable_checkpointing": False,
              "enable_progress_bar": progress, "enable_model_summary": False, "num_sanity_val_steps": 0}
    if device is not None and torch.device(device).type == "cpu":
        kwargs["accelerator"] = "cpu"
    kwargs.update(trainer_kwargs or {})
    if default_root_dir:
        kwargs.setdefault("default_root_dir", default_root_dir)
    trainer = pl.Trainer(**kwargs)
    trainer.fit(module, datamodule=dm)
    return module.results()


__all__ = ["BEST_LABEL", "LinearHead", "LinearProbe", "linear_probe_on_features", "run_linear_probe",
           "standardization_stats"]
