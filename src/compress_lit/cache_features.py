"""`python -m compress_lit.cache_features`: run the frozen teacher once over the training set and store its
features by dataset index, for training with ``teacher.cached=true`` (see :mod:`compress_lit.teachers.cache`).

It takes the same command line as ``compress_lit.train`` (same config groups and schema, plus ``cache.*``), so
the usual sequence is::

    python -m compress_lit.cache_features teacher=resnet50x4 data=imagenet data.root=/path teacher.checkpoint=...
    python -m compress_lit.train          teacher=resnet50x4 data=imagenet data.root=/path teacher.checkpoint=... \\
        student=alexnet teacher.cached=true

What the teacher sees: the evaluation transform of the train split (Resize 256 + CenterCrop 224 on ImageNet), in
index order; with ``teacher.cache_views=K`` (or ``cache.views=K``) K seeded training augmentations per image
instead. Output: ``cache.output``, else ``teacher.cache_path``, else
``${cache_dir}/features/<teacher.name>_<data.name>`` (``_views<K>`` for K > 1). Other settings:
``cache.dtype`` (float16 | float32), ``cache.batch_size`` (default ``data.eval_batch_size``),
``cache.chunk_batches`` (progress is saved every so many batches; an interrupted run resumes),
``cache.max_chunks`` (stop early, e.g. within a job's time limit), ``cache.overwrite`` (replace a cache built for
something else instead of refusing).

Devices come from the ``trainer`` group (accelerator, devices, num_nodes, strategy, precision) through Lightning
Fabric: with several devices every process computes a contiguous shard of the indices into the shared file
(``trainer=ddp``, or under ``torchrun``/SLURM); ``bf16-mixed`` runs the teacher under autocast, ``auto`` where the
device computes bf16 natively (:mod:`compress_lit.runtime.precision`).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from .runtime.config import register_configs
from .data import build_datamodule
from .data.workers import cap_num_workers
from .runtime.precision import apply_precision, resolved_precision
from .runtime.safety import check_writable
from .teachers import build_teacher
from .teachers.cache import build_cache, cache_dataset, cache_meta, cache_path, cache_views, validate_cache_config
from .runtime.startup import entry_main, run_entry
from .train import check_train_startup, ensure_teacher_checkpoint

log = logging.getLogger("compress_lit.cache_features")
register_configs()
FABRIC_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision")


def _cache_setting(cfg: Any, key: str, default: Any) -> Any:
    v = OmegaConf.select(cfg, f"cache.{key}", default=None)
    return default if v is None else v


def compute_for_config(cfg: DictConfig, dm=None, *, device: str | torch.device = "cpu",
                       autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                       progress: bool = True) -> dict:
    """Build (or resume) the cache of a training/cache_features config on ``device``; returns its meta.

    Expects the teacher checkpoint to exist (see ``ensure_teacher_checkpoint``) and the RNG seeded with
    ``cfg.seed`` (random-format teachers are initialised under it). ``dm``: the set-up datamodule, if any."""
    validate_cache_config(cfg)
    views = cache_views(cfg)
    if dm is None:
        dm = build_datamodule(cfg.data)
        dm.setup("fit")
    teacher = build_teacher(cfg.teacher).to(device)
    base_seed = int(_cache_setting(cfg, "view_seed", 0))
    meta = cache_meta(cfg.teacher, cfg.data, teacher, dm.num_train, views,
                      dtype=str(_cache_setting(cfg, "dtype", "float16")), base_seed=base_seed, seed=cfg.seed,
                      samples=dm.train_dataset_eval.fingerprint(), precision=resolved_precision(cfg.trainer))
    return build_cache(cache_path(cfg), teacher, cache_dataset(dm, views, base_seed), meta,
                       batch_size=int(_cache_setting(cfg, "batch_size", cfg.data.eval_batch_size)),
                       num_workers=cap_num_workers(cfg.data.num_workers), device=device,
                       chunk_batches=int(_cache_setting(cfg, "chunk_batches", 50)),
                       max_chunks=_cache_setting(cfg, "max_chunks", None),
                       overwrite=bool(_cache_setting(cfg, "overwrite", False)), autocast=autocast,
                       progress=progress)


def local_device_and_autocast(trainer_cfg: Any) -> tuple[torch.device, Optional[Callable]]:
    """One process, no launcher (the in-training build): a GPU when the trainer config allows one, and autocast
    for a ``bf16``/``16`` mixed precision setting (``auto`` resolved as every entry point does, precision.py)."""
    accel = str(trainer_cfg.get("accelerator", "auto"))
    use_cuda = torch.cuda.is_available() and accel in ("auto", "gpu", "cuda")
    device = torch.device("cuda" if use_cuda else "cpu")
    precision = resolved_precision(trainer_cfg)  # `auto`: bf16-mixed only where the device computes bf16 natively
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") \
        else None
    if dtype is None or (dtype == torch.float16 and not use_cuda):
        return device, None
    return device, lambda: torch.autocast(device.type, dtype=dtype)


def run_cache_features(cfg: DictConfig) -> dict:
    check_train_startup(cfg)  # as compress_lit.train: mandatory keys, values, the accelerator, the teacher's file
    apply_precision(cfg.trainer)  # Fabric does not know trainer.precision=auto
    validate_cache_config(cfg)
    out = cache_path(cfg)
    check_writable(out.parent, "the feature cache folder", cfg.safety.min_free_gb)
    if cfg.teacher.checkpoint and cfg.teacher.format != "random":
        ensure_teacher_checkpoint(cfg.teacher)  # before the launch: the other processes find it there
    from lightning_fabric import Fabric

    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    fabric = Fabric(**{k: tcfg[k] for k in FABRIC_KEYS if k in tcfg})
    fabric.launch()
    pl.seed_everything(cfg.seed, workers=True)
    meta = compute_for_config(cfg, device=fabric.device, autocast=fabric.autocast,
                              progress=bool(_cache_setting(cfg, "progress", True)) and fabric.is_global_zero)
    if fabric.is_global_zero:
        state = "complete" if meta.get("complete") else f"incomplete ({meta.get('done')} samples; re-run to resume)"
        print(f"[compress_lit] teacher features {out}: {tuple(meta['shape'])} {meta['dtype']}, {state}\n"
              f"  train with: python -m compress_lit.train <the same overrides> teacher.cached=true"
              + (f" teacher.cache_views={meta['views']}" if meta["views"] > 1 else "")
              + (f" teacher.cache_path={out}" if OmegaConf.select(cfg, "cache.output") else ""), flush=True)
    return meta


@entry_main("cache_features")
def main(cfg: DictConfig) -> None:
    run_entry("cache_features", lambda: run_cache_features(cfg))


if __name__ == "__main__":
    main()
