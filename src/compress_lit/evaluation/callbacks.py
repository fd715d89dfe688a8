"""Lightning callbacks evaluating the module's embedding (``pl_module.forward``) during training.

``KNNCallback`` logs ``eval/knn_top1_k{k}`` (and ``eval/knn_top5_k{k}`` with more than 5 classes);
``ClusterAlignmentCallback`` logs ``eval/cluster_acc`` (mean over its seeds), ``eval/cluster_nmi`` and
``eval/cluster_ari``. Both run at the end of every ``every_n_epochs``-th training epoch (and of the last), on the
datamodule's ``bank_dataloader()`` (bank / k-means) and ``val_dataloader()`` (queries), optionally on a fixed
seeded subset of each (``train_subset`` / ``val_subset`` samples) to keep them cheap.

DDP: the work runs on global rank 0 only (features of the subset, then the evaluation), the other processes wait at
``trainer.strategy.barrier`` before and after; metrics are logged with ``pl_module.log(..., rank_zero_only=True)``
(they reach the logger and ``trainer.callback_metrics``). When both callbacks run at the same step they share one
feature extraction.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset

from ..data.datamodule import bank_loader
from .features import extract_features


def _subset_loader(loader: DataLoader, size: Optional[int], seed: int) -> DataLoader:
    if size is None or size >= len(loader.dataset):
        return loader
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(loader.dataset), generator=g)[:size].sort().values.tolist()
    return DataLoader(Subset(loader.dataset, idx), batch_size=loader.batch_size, shuffle=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn)


class _EmbeddingEvalCallback(pl.Callback):
    def __init__(self, every_n_epochs: int = 1, train_subset: Optional[int] = None, val_subset: Optional[int] = None,
                 seed: int = 0, datamodule: Any = None, prefix: str = "eval"):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.train_subset, self.val_subset, self.seed = train_subset, val_subset, seed
        self.datamodule = datamodule
        self.prefix = prefix
        self.history: list[dict[str, float]] = []
        self._device = None

    # -------------------------------------------------------------------------------------------- plumbing
    def _due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
        return epoch % self.every_n_epochs == 0 or last

    def _features(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        dm = self.datamodule or trainer.datamodule
        if dm is None:
            raise RuntimeError(f"{type(self).__name__} needs a datamodule (trainer.fit(datamodule=...) or "
                               f"datamodule=)")
        key = (trainer.global_step, trainer.current_epoch, id(dm), self.train_subset, self.val_subset, self.seed)
        memo = getattr(trainer, "_compress_eval_features", None)
        if memo is not None and memo[0] == key:
            return memo[1]
        train = _subset_loader(bank_loader(dm), self.train_subset, self.seed)
        val = _subset_loader(dm.val_dataloader(), self.val_subset, self.seed + 1)
        tx, ty = extract_features(pl_module, train, pl_module.device)
        vx, vy = extract_features(pl_module, val, pl_module.device)
        num_classes = getattr(dm, "num_classes", None)
        feats = (tx, ty, vx, vy, num_classes)
        trainer._compress_eval_features = (key, feats)
        return feats

    def compute(self, feats) -> dict[str, float]:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer) or trainer.sanity_checking:
            return
        trainer.strategy.barrier("compress_eval_start")
        metrics: dict[str, float] = {}
        if trainer.is_global_zero:
            self._device = pl_module.device
            with torch.no_grad():
                metrics = self.compute(self._features(trainer, pl_module))
            self.history.append({"epoch": trainer.current_epoch, **metrics})
            for name, value in metrics.items():
                pl_module.log(name, float(value), rank_zero_only=True, on_step=False, on_epoch=True)
        trainer.strategy.barrier("compress_eval_end")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if hasattr(trainer, "_compress_eval_features"):
            trainer._compress_eval_features = None  # free the memo


class KNNCallback(_EmbeddingEvalCallback):
    """k-NN top-1 (and top-5) of the embedding every ``every_n_epochs`` epochs; see :mod:`.knn`."""

    def __init__(self, every_n_epochs: int = 1, ks: Iterable[int] = (1, 20), weighting: str = "majority",
                 backend: str = "auto", temperature: float = 0.07, **kw):
        super().__init__(every_n_epochs, **kw)
        self.ks, self.weighting, self.backend, self.temperature = list(ks), weighting, backend, temperature

    def compute(self, feats) -> dict[str, float]:
        from .knn import knn_evaluate

        tx, ty, vx, vy, num_classes = feats
        res = knn_evaluate(tx, ty, vx, vy, ks=self.ks, num_classes=num_classes, weighting=self.weighting,
                           temperature=self.temperature, backend=self.backend, device=self._device)
        return {f"{self.prefix}/knn_{k}": v for k, v in res.items()}


class ClusterAlignmentCallback(_EmbeddingEvalCallback):
    """Cluster-alignment accuracy (mean over ``seeds``), NMI and ARI every ``every_n_epochs`` epochs."""

    def __init__(self, every_n_epochs: int = 1, k: Optional[int] = None, niter: int = 20, seeds: int = 1,
                 normalize: bool = True, **kw):
        super().__init__(every_n_epochs, **kw)
        self.k, self.niter, self.seeds, self.normalize = k, niter, seeds, normalize

    def compute(self, feats) -> dict[str, float]:
        from .cluster import cluster_alignment

        tx, ty, vx, vy, num_classes = feats
        res = cluster_alignment(tx, ty, vx, vy, num_classes=num_classes, k=self.k, niter=self.niter,
                                seeds=self.seeds, normalize=self.normalize).summary()
        return {f"{self.prefix}/cluster_acc": res["acc_mean"], f"{self.prefix}/cluster_nmi": res["nmi_mean"],
                f"{self.prefix}/cluster_ari": res["ari_mean"]}


__all__ = ["ClusterAlignmentCallback", "KNNCallback"]
