"""The cached teacher's configuration, read here and nowhere else: where the cache of a (training or
cache_features) root config lives (``cache.output``, ``teacher.cache_path``, the default), how many views it
holds, the range checks of ``teacher.cache_views`` and ``cache.*``, and the build settings (``cache.dtype``,
``cache.batch_size``, ``cache.chunk_batches``, ``cache.max_chunks``, ``cache.overwrite``, ``cache.view_seed``,
``cache.progress``) with which :func:`compute_for_config` builds the cache (:mod:`compress_lit.teachers.cache`)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..data import build_datamodule
from ..data.workers import cap_num_workers
from ..runtime.config import ConfigError
from ..runtime.precision import resolved_precision
from .cache import DTYPES, MAX_VIEWS, build_cache, cache_dataset, cache_meta, default_cache_path
from .loading import build_teacher


def cache_views(cfg: Any) -> int:
    """K for a (training or cache_features) root config: ``cache.views`` if set, else ``teacher.cache_views``."""
    v = _select(cfg, "cache.views")
    return int(v if v is not None else (_select(cfg, "teacher.cache_views") or 1))


def cache_path(cfg: Any) -> Path:
    """The cache directory for a root config: ``cache.output``, else ``teacher.cache_path``, else the default."""
    for key in ("cache.output", "teacher.cache_path"):
        v = _select(cfg, key)
        if v:
            return Path(os.path.expanduser(str(v)))
    return default_cache_path(cfg.cache_dir, cfg.teacher.name, cfg.data.name, cache_views(cfg))


def validate_cache_config(cfg: Any) -> None:
    """Range checks of the cache settings (``teacher.cache_views``, ``cache.*``); raises ConfigError."""
    for key in ("teacher.cache_views", "cache.views"):
        v = _select(cfg, key)
        if v is not None and not 1 <= v <= MAX_VIEWS:
            raise ConfigError(f"{key}={v!r} is invalid: need 1 <= views <= {MAX_VIEWS}")
    for key in ("cache.batch_size", "cache.chunk_batches", "cache.max_chunks"):
        v = _select(cfg, key)
        if v is not None and v <= 0:
            raise ConfigError(f"{key}={v!r} is invalid: it must be > 0")
    v = _select(cfg, "cache.view_seed")
    if v is not None and not 0 <= v < (1 << 32):
        raise ConfigError(f"cache.view_seed={v!r} is invalid: need 0 <= seed < 2**32")
    v = _select(cfg, "cache.dtype")
    if v is not None and v not in DTYPES:
        raise ConfigError(f"cache.dtype={v!r} is invalid: choose one of {list(DTYPES)}")


def _select(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        if node is None:
            return None
        try:
            node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
        except Exception:  # noqa: BLE001 - a missing key or an unresolved value: not set
            return None
    return node


def cache_setting(cfg: Any, key: str, default: Any) -> Any:
    """``cache.<key>`` of a root config, ``default`` when it is not set (or null)."""
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
    base_seed = int(cache_setting(cfg, "view_seed", 0))
    meta = cache_meta(cfg.teacher, cfg.data, teacher, dm.num_train, views,
                      dtype=str(cache_setting(cfg, "dtype", "float16")), base_seed=base_seed, seed=cfg.seed,
                      samples=dm.train_dataset_eval.fingerprint(), precision=resolved_precision(cfg.trainer))
    return build_cache(cache_path(cfg), teacher, cache_dataset(dm, views, base_seed), meta,
                       batch_size=int(cache_setting(cfg, "batch_size", cfg.data.eval_batch_size)),
                       num_workers=cap_num_workers(cfg.data.num_workers), device=device,
                       chunk_batches=int(cache_setting(cfg, "chunk_batches", 50)),
                       max_chunks=cache_setting(cfg, "max_chunks", None),
                       overwrite=bool(cache_setting(cfg, "overwrite", False)), autocast=autocast,
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


__all__ = ["cache_path", "cache_setting", "cache_views", "compute_for_config", "local_device_and_autocast",
           "validate_cache_config"]
