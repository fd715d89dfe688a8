"""The Lightning data module: train / val / train-eval loaders built from a :class:`~compress_lit.runtime.config.DataConfig`.

* ``train_dataloader``: training augmentation (``MultiView`` of it when ``views > 1``), shuffled, ``drop_last``.
* ``val_dataloader``: evaluation transform on the val split, in order.
* ``train_eval_dataloader``: evaluation transform on the training images, in order (feature caches, CC's k-means).
* ``bank_dataloader``: evaluation transform on the evaluation's train side, in order (k-NN bank, k-means set, linear
  probe): the training images, or with ``data.eval_full_train`` the whole train split they were drawn from.

``wrap_train(fn)`` replaces the training dataset by ``fn(dataset)`` (the cached teacher's ``SeededViews``).

Under DDP Lightning replaces the samplers of the train/val loaders with a DistributedSampler itself, and
``data.batch_size`` is the global batch: each process loads ``data.batch_size / world size`` images.

``data.loader=dali`` (image folders): every loader above is a :class:`~.dali_loader.DaliLoader` over the same
resolved samples, decoding on the training GPU (or the CPU without one); the training loader shards itself by
global rank with the distributed sampler's rule (:mod:`.epoch_order`). ``channels_last``: its batches come with
channels-last strides (``perf.channels_last``). :mod:`.dali_loader` is imported only then.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ..runtime.distributed import per_process_batch
from .datasets import DatasetError, load_splits, split_holdout, take_subset
from .transforms import MultiView, eval_transform, train_transform
from .workers import cap_num_workers


class CompressDataModule(pl.LightningDataModule):
    """Datasets and loaders for ``cfg`` (a ``DataConfig`` or the ``data`` node of a Hydra config).

    ``setup`` loads the datasets once (later calls do nothing); the properties below call it when needed, so
    ``num_classes`` etc. can be read before a Trainer exists. Every dataset yields ``(image, label, index)``.
    """

    def __init__(self, cfg: Any, views: int = 1, channels_last: bool = False):
        super().__init__()
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.cfg = cfg
        self.views = int(views)
        self.channels_last = bool(channels_last)  # DALI batches with channels-last strides
        self.loader = str(getattr(cfg, "loader", "torch") or "torch")  # torch | dali
        self._train = None  # training transform
        self._train_eval = None  # evaluation transform on the train split
        self._val = None
        self._bank = None  # evaluation transform on the evaluation's train side (bank_dataloader)
        self._train_wrapper = None  # see wrap_train

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self, stage: Optional[str] = None) -> None:
        if self._train is not None:
            return
        cfg = self.cfg
        train, val = load_splits(cfg)
        if getattr(cfg, "holdout", None) is not None:  # a validation split carved from train; the test split unused
            train, val = split_holdout(train, int(cfg.holdout), cfg.split_seed)
        whole = train
        train = take_subset(train, cfg.train_subset, cfg.split_seed, "data.train_subset")
        val = take_subset(val, cfg.val_subset, cfg.split_seed, "data.val_subset")
        augment = train_transform(cfg)
        if self.views > 1:
            augment = MultiView(augment, self.views)
        evaluate = eval_transform(cfg)
        self._train = train.with_transform(augment)
        if self._train_wrapper is not None:
            self._train = self._train_wrapper(self._train)
        self._train_eval = train.with_transform(evaluate)
        self._val = val.with_transform(evaluate)
        self._bank = whole.with_transform(evaluate) if getattr(cfg, "eval_full_train", False) else self._train_eval

    def wrap_train(self, fn) -> None:
        """Replace the training dataset by ``fn(dataset)`` (e.g. the cached teacher's ``SeededViews``), now if
        set up already, else at ``setup``. ``train_dataset_eval`` is not wrapped."""
        self._train_wrapper = fn
        if self._train is not None:
            self._train = fn(self._train)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def train_dataset(self):
        """The train split with the training transform."""
        self.setup()
        return self._train

    @property
    def train_dataset_eval(self):
        """The train split with the evaluation transform (same indices as ``train_dataset``)."""
        self.setup()
        return self._train_eval

    @property
    def bank_dataset(self):
        """The evaluation's train side (k-NN bank, k-means set, probe training set), evaluation transform: the
        training images, or the whole train split with ``data.eval_full_train``."""
        self.setup()
        return self._bank

    @property
    def val_dataset(self):
        """The val split with the evaluation transform."""
        self.setup()
        return self._val

    @property
    def class_names(self) -> list[str]:
        return list(self.train_dataset.classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_train(self) -> int:
        return len(self.train_dataset)

    @property
    def num_val(self) -> int:
        return len(self.val_dataset)

    # ----------------------------------------------------------------------------------------- dataloaders
    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1

    def _global_rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0

    def _cuda_device(self) -> Optional[int]:
        """The CUDA device this process trains on (DALI decodes there), or ``None`` (CPU)."""
        if not torch.cuda.is_available():
            return None
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return torch.cuda.current_device()
        from pytorch_lightning.accelerators import CUDAAccelerator

        if not isinstance(trainer.accelerator, CUDAAccelerator):
            return None
        return trainer.strategy.root_device.index

    def _dali(self, dataset, batch_size: int, train: bool):
        from .dali_loader import DaliLoader
        from .dali_pipelines import DaliSpec

        if train and self._train_wrapper is not None:
            raise DatasetError("data.loader=dali cannot show the student the cached teacher's augmented views "
                               "(teacher.cache_views > 1): use data.loader=torch or teacher.cache_views=1")
        spec = DaliSpec.from_config(self.cfg, views=self.views if train else 1, channels_last=self.channels_last)
        world, rank = (self._world_size(), self._global_rank()) if train else (1, 0)
        return DaliLoader(dataset, spec, train=train, batch_size=batch_size,
                          num_threads=max(1, cap_num_workers(self.cfg.num_workers)), device_id=self._cuda_device(),
                          rank=rank, world_size=world)

    def _pin_memory(self) -> bool:
        if not torch.cuda.is_available():
            return False
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return True
        from pytorch_lightning.accelerators import CUDAAccelerator

        return isinstance(trainer.accelerator, CUDAAccelerator)

    def _loader(self, dataset, batch_size: int, shuffle: bool, drop_last: bool, persistent: bool) -> DataLoader:
        if self.loader == "dali":  # the training loader (shuffle) or an evaluation one
            return self._dali(dataset, batch_size, train=shuffle)
        workers = cap_num_workers(self.cfg.num_workers)  # at most the CPUs available (logged once)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          num_workers=workers, persistent_workers=persistent and workers > 0,
                          pin_memory=self._pin_memory())

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        world = self._world_size()
        # data.batch_size is the global batch: each process loads its share (distributed.py)
        batch_size = per_process_batch(int(self.cfg.batch_size), world)
        per_rank = math.ceil(len(dataset) / world)
        if batch_size > per_rank:
            where = f" per process ({world} processes, {batch_size} images each)" if world > 1 else ""
            raise DatasetError(f"data.batch_size={self.cfg.batch_size} is larger than the {per_rank} training "
                               f"samples{where} of data.name={self.cfg.name}: with drop_last=True no batch would "
                               f"be produced; lower data.batch_size or enlarge data.train_subset")
        return self._loader(dataset, batch_size, shuffle=True, drop_last=True, persistent=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, int(self.cfg.eval_batch_size), shuffle=False, drop_last=False,
                            persistent=True)

    def train_eval_dataloader(self) -> DataLoader:
        """The train split with the evaluation transform, in order. Built anew on each call (its workers are
        not persistent), as it is typically used once per evaluation."""
        return self._loader(self.train_dataset_eval, int(self.cfg.eval_batch_size), shuffle=False,
                            drop_last=False, persistent=False)

    def bank_dataloader(self) -> DataLoader:
        """:attr:`bank_dataset`, in order (not persistent, like ``train_eval_dataloader``)."""
        return self._loader(self.bank_dataset, int(self.cfg.eval_batch_size), shuffle=False, drop_last=False,
                            persistent=False)


def bank_loader(dm) -> DataLoader:
    """The evaluation's train-side loader of any datamodule: ``bank_dataloader()`` where it has one, else its
    ``train_eval_dataloader()`` (e.g. VOC's)."""
    fn = getattr(dm, "bank_dataloader", None)
    return fn() if fn is not None else dm.train_eval_dataloader()


def build_datamodule(cfg: Any, views: int = 1, channels_last: bool = False) -> CompressDataModule:
    """A :class:`CompressDataModule` for the data config ``cfg``; ``views > 1`` gives MultiView training batches;
    ``channels_last``: DALI's batches come with channels-last strides (``perf.channels_last``)."""
    return CompressDataModule(cfg, views=views, channels_last=channels_last)
