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

Any layer: a spatial map (a conv layer) becomes a vector by average-pooling it to a grid of about
``cfg.pooled_dim`` numbers (9,216 by default: the ~9k-per-layer convention of the AlexNet per-layer tables the
paper compares with; :func:`~compress_lit.evaluation.features.vectorize`); ``pooled_dim=None`` pools globally.
Several layers (``layers=``): one head per layer, all trained together on one backbone pass per batch; each head
has its own initialisation (seeded by ``cfg.seed``), statistics and gradients, so a head's numbers are those of a
single-layer run of that layer. 10-crop: a held-out batch ``B x 10 x C x H x W`` is scored by the mean of the
ten crops' softmax probabilities (:mod:`~compress_lit.evaluation.ten_crop`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ..data.datamodule import bank_loader
from ..runtime.distributed import all_gather_cat
from ..methods.schedule import LRSchedule
from .features import layers_fn, merge_shards
from .settings import LinearProbeConfig
from .ten_crop import average_crop_probabilities

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


def _scores(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The head's logits of ``B x D`` features, or the crop-averaged softmax of ``B x crops x D`` features."""
    if x.ndim == 3:
        return average_crop_probabilities(head(x.flatten(0, 1)).view(x.shape[0], x.shape[1], -1))
    return head(x)


def _seeded_head(dim: int, num_classes: int, mean, std, seed: int) -> LinearHead:
    """A head initialised from ``seed`` alone (not from the global generator's state): the same head for a layer
    whether it is probed alone or beside other layers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LinearHead(dim, num_classes, mean, std)


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

    ``test_x`` may be ``N x crops x D`` (10-crop): an image's prediction is then the mean of its crops' softmax.

    Returns ``{"top1", "top5" (classes > 5), "epochs", BEST_LABEL: {"top1", "epoch"}, "history": [top1 per epoch],
    "mean", "std"}``; the reported number is ``top1``, the final epoch's.
    """
    cfg = _cfg(cfg, overrides)
    tx, vx = _t(train_x).flatten(1), _t(test_x)
    vx = vx if vx.ndim == 3 else vx.flatten(1)  # N x crops x D: 10-crop test features
    ty, vy = _t(train_y, torch.long), _t(test_y, torch.long)
    num_classes = int(num_classes or int(max(ty.max(), vy.max())) + 1)
    small = torch.device(device).type == "cpu" and cfg.batch_size * tx.shape[1] * num_classes
    with _single_thread_if_small(int(small) if small else 1 << 62):
        return _probe_on_features(tx, ty, vx, vy, num_classes, cfg, device)


def _probe_on_features(tx, ty, vx, vy, num_classes: int, cfg: LinearProbeConfig, device) -> dict[str, Any]:
    mean, std = standardization_stats(tx)
    head = _seeded_head(tx.shape[1], num_classes, mean, std, cfg.seed).to(device)
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
                logits = _scores(head, vx[s:s + 4096])
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
EMBEDDING_KEY = "_embedding"  # the head of layer None (the embedding) in LinearProbe.heads
_FIRST = object()  # LinearProbe.results(): the first layer


def _key(layer: Optional[str]) -> str:
    return EMBEDDING_KEY if layer is None else str(layer)


class LinearProbe(pl.LightningModule):
    """Linear heads over a frozen backbone: one per layer of ``backbone.layer_names`` (``None``: the embedding).

    One layer: ``LinearProbe(backbone, num_classes, mean, std, cfg, layer=...)``; several:
    ``LinearProbe(backbone, num_classes, cfg=cfg, stats={layer: (mean, std), ...})``, all heads trained on one
    backbone pass per batch (the summed loss gives each head exactly its own gradient). ``mean``/``std``:
    :func:`standardization_stats` of the centre-crop train features of that layer (vectorised with
    ``cfg.pooled_dim``). A ``B x crops x C x H x W`` validation batch (10-crop) is scored by the crop-averaged
    softmax. Logs ``train/loss`` (mean over the heads), ``val/top1``, ``val/top5`` (one layer) or
    ``val/<layer>/top1`` per epoch; :meth:`results` gives the final epoch's top-1 (the reported number) and the
    best epoch (not the reported number) of a layer.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, mean: Optional[torch.Tensor] = None,
                 std: Optional[torch.Tensor] = None, cfg: Optional[LinearProbeConfig] = None,
                 layer: Optional[str] = None, *, stats: Optional[dict] = None):
        super().__init__()
        self.cfg = _cfg(cfg, {})
        self.backbone = backbone.requires_grad_(False).eval()
        if stats is None:
            stats = {layer: (mean, std)}
        self.layers: list[Optional[str]] = list(stats)
        self.layer = self.layers[0]
        self._features: Callable = layers_fn(self.backbone, self.layers, self.cfg.pooled_dim)
        self.heads = nn.ModuleDict({_key(name): _seeded_head(int(_t(m).numel()), num_classes, m, sd, self.cfg.seed)
                                    for name, (m, sd) in stats.items()})
        self.num_classes = num_classes
        self.histories: dict[Optional[str], list[float]] = {name: [] for name in self.layers}
        self.histories_top5: dict[Optional[str], list[float]] = {name: [] for name in self.layers}
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def head(self) -> LinearHead:
        """The head of the first (with one layer: the only) layer."""
        return self.heads[_key(self.layer)]

    @property
    def history(self) -> list[float]:
        return self.histories[self.layer]

    @property
    def history_top5(self) -> list[float]:
        return self.histories_top5[self.layer]

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm keeps its running statistics, dropout off
        return self

    def on_train_epoch_start(self) -> None:
        self.backbone.eval()  # Lightning restores captured per-module modes; make sure the backbone stays frozen

    def logits(self, x: torch.Tensor) -> dict[Optional[str], torch.Tensor]:
        """``{layer: logits}``; ``B x crops x K`` for a ``B x crops x C x H x W`` batch."""
        if self.backbone.training:
            self.backbone.eval()
        with torch.no_grad():
            feats = self._features(x)
        return {name: self.heads[_key(name)](f.flatten(0, 1)).view(*f.shape[:2], -1) if f.ndim == 3
                else self.heads[_key(name)](f) for name, f in feats.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The first layer's logits."""
        return self.logits(x)[self.layer]

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        losses = [F.cross_entropy(out, y) for out in self.logits(x).values()]
        loss = torch.stack(losses).sum()
        self.log("train/loss", loss.detach() / len(losses), on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=x.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch, batch_idx):
        x, y, idx = batch
        hits = []
        for out in self.logits(x).values():
            scores = average_crop_probabilities(out) if out.ndim == 3 else out
            hits.append(torch.stack([_topk_hits(scores, y, 1), _topk_hits(scores, y, 5)], 1))
        self._val.append((idx.detach(), torch.stack(hits, 1).float().detach()))  # B x layers x (top1, top5)

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        idx = torch.cat([v[0] for v in self._val])
        hits = torch.cat([v[1] for v in self._val])
        self._val = []
        if self.trainer.world_size > 1:  # every process scored its shard: gather, drop the sampler's padding
            shape = hits.shape[1:]
            idx = all_gather_cat(idx).reshape(-1)
            hits = all_gather_cat(hits).reshape(-1, *shape)
            hits, _ = merge_shards(hits, idx, idx)
        acc = 100.0 * hits.mean(0)  # layers x 2
        for i, name in enumerate(self.layers):
            top1, top5 = float(acc[i, 0]), float(acc[i, 1])
            prefix = "val" if len(self.layers) == 1 else f"val/{_key(name)}"
            self.log(f"{prefix}/top1", top1, prog_bar=len(self.layers) == 1, sync_dist=False, rank_zero_only=True)
            if self.num_classes > 5:
                self.log(f"{prefix}/top5", top5, rank_zero_only=True)
            if not self.trainer.sanity_checking:
                self.histories[name].append(top1)
                self.histories_top5[name].append(top5)

    @property
    def final_top1(self) -> float:
        return self.history[-1] if self.history else float("nan")

    def results(self, layer: Any = _FIRST) -> dict[str, Any]:
        """The results of ``layer`` (default: the first): the final epoch's top-1 (the reported number), top-5,
        the best epoch (not the reported number) and the per-epoch history."""
        name = self.layer if layer is _FIRST else layer
        history, history5 = self.histories[name], self.histories_top5[name]
        out: dict[str, Any] = {"top1": history[-1] if history else float("nan"), "epochs": len(history)}
        if self.num_classes > 5 and history5:
            out["top5"] = history5[-1]
        if history:
            b = int(np.argmax(history))
            out[BEST_LABEL] = {"top1": history[b], "epoch": b + 1}
        out["history"] = list(history)
        return out

    def configure_optimizers(self):
        from ..methods.schedule import build_optimizer

        return build_optimizer(self.heads.parameters(), _optim_namespace(self.cfg))


def linear_datamodule_config(data_cfg, cfg: LinearProbeConfig):
    """The data config of the probe: ``batch_size`` from the probe config, optional ``crop_scale``."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(data_cfg, resolve=True) if not isinstance(data_cfg, dict) else dict(data_cfg)
    d["batch_size"] = int(cfg.batch_size)
    if cfg.crop_scale is not None:
        d["crop_scale"] = list(cfg.crop_scale)
    if d.get("eval_full_train"):  # the probe trains on the evaluation's train side: the whole train split
        d["train_subset"] = None
    from ..runtime.config import DataConfig

    return OmegaConf.merge(OmegaConf.structured(DataConfig), d)


def run_linear_probe(backbone: nn.Module, data_cfg, cfg: Optional[LinearProbeConfig] = None,
                     layer: Optional[str] = None, train_feats=None, trainer_kwargs: Optional[dict] = None,
                     device: str | torch.device = "cpu", progress: bool = False, datamodule=None,
                     default_root_dir: Optional[str] = None, *, layers: Optional[list] = None,
                     ten_crop: bool = False) -> dict[str, Any]:
    """The full protocol: statistics from the centre-crop train features (``train_feats``, or extracted here),
    then Lightning training with the datamodule's augmentation, val every epoch; :meth:`LinearProbe.results`.

    ``layers=[...]``: one head per layer over one backbone pass per batch; returns ``{layer: results}``
    (``train_feats`` then a ``{layer: features}`` dict, or None). ``ten_crop``: validate on the 10-crop held-out
    loader (needs ``data_cfg``). The global generator is reseeded with ``cfg.seed`` just before training, so the
    batches do not depend on what ran before (cached features or not, other layers or not).
    """
    from ..data import build_datamodule
    from .features import extract_layer_features

    cfg = _cfg(cfg, {})
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = datamodule or build_datamodule(linear_datamodule_config(data_cfg, cfg))
    dm.setup("fit")
    if datamodule is None and cfg.batch_size > len(dm.train_dataset):  # one's own small folder: still a probe
        import logging
        from dataclasses import replace

        n = len(dm.train_dataset)
        logging.getLogger("compress_lit").warning(
            "linear.batch_size=%d is larger than the %d training images: the probe trains on batches of %d",
            cfg.batch_size, n, n)
        cfg = replace(cfg, batch_size=n)
        dm = build_datamodule(linear_datamodule_config(data_cfg, cfg))
        dm.setup("fit")
    names = list(layers) if layers is not None else [layer]
    if train_feats is not None and layers is None:
        train_feats = {layer: train_feats}
    if train_feats is None:
        extracted = extract_layer_features(backbone, bank_loader(dm), names, device, progress,
                                           pooled_dim=cfg.pooled_dim, desc="train features")
        train_feats = {name: f for name, (f, _) in extracted.items()}
    stats = {name: standardization_stats(train_feats[name]) for name in names}
    module = LinearProbe(backbone, dm.num_classes, cfg=cfg, stats=stats)
    if ten_crop:
        from .ten_crop import TenCropValidation

        dm = TenCropValidation(dm, linear_datamodule_config(data_cfg, cfg))
    kwargs = {"max_epochs": cfg.epochs, "logger": False, "enable_checkpointing": False,
              "enable_progress_bar": progress, "enable_model_summary": False, "num_sanity_val_steps": 0}
    if device is not None and torch.device(device).type == "cpu":
        kwargs["accelerator"] = "cpu"
    kwargs.update(trainer_kwargs or {})
    if default_root_dir:
        kwargs.setdefault("default_root_dir", default_root_dir)
    trainer = pl.Trainer(**kwargs)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer.fit(module, datamodule=dm)
    if layers is None:
        return module.results()
    return {name: module.results(name) for name in names}


__all__ = ["BEST_LABEL", "LinearHead", "LinearProbe", "linear_probe_on_features", "run_linear_probe",
           "standardization_stats"]
