"""The teacher of a training run: its checkpoint (the demo teacher is pretrained first when it is missing) and,
with ``teacher.cached=true``, its features from the cache (built first when asked to); ``run_cache_features``
builds that cache on every process of a launch (``python -m compress_lit.cache_features``)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ..runtime.config import ConfigError
from ..runtime.precision import apply_precision, resolved_precision
from ..runtime.safety import StartupError, check_writable
from ..runtime.startup import QUIET_INTERRUPT
from ..teachers.cache import (CacheMissingError, SeededViews, TeacherCacheError, cache_features_command, expected_meta,
                              open_cache)
from ..teachers.cache_config import (cache_path, cache_setting, cache_views, compute_for_config,
                                     local_device_and_autocast, validate_cache_config)
from . import checks

log = logging.getLogger("compress_lit.train")
FABRIC_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision")


def ensure_teacher_checkpoint(tcfg, trainer_cfg=None) -> None:
    """Build the demo teacher with the pretraining entry point when its checkpoint is not there yet. The
    pretraining runs with ``resume=auto``: after a Ctrl-C or a kill, the next run continues it from its last epoch
    checkpoint; ``trainer.enable_progress_bar`` (of ``trainer_cfg``) reaches it."""
    path = Path(tcfg.checkpoint)
    if path.exists() or not tcfg.pretrain_if_missing:
        return
    bar = [] if trainer_cfg is None else [f"trainer.enable_progress_bar={str(trainer_cfg.enable_progress_bar).lower()}"]
    cmd = [sys.executable, "-m", "compress_lit.pretrain", *tcfg.pretrain_args, *bar, "resume=auto", f"output={path}"]
    print(f"[compress_lit] teacher checkpoint {path} not found: pretraining it first with\n  {' '.join(cmd)}",
          flush=True)
    stopped = KeyboardInterrupt(f"the teacher's pretraining stopped; the same command continues it from its last "
                                f"epoch ({' '.join(cmd[1:3])} resume=auto)")
    proc = subprocess.Popen(cmd, env={**os.environ, QUIET_INTERRUPT: "train"})
    try:
        returncode = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached both: let the pretraining end its step and close its files
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise stopped from None
    if returncode == 130:
        raise stopped
    if returncode != 0:
        raise StartupError(f"pretraining the teacher for teacher.checkpoint={path} failed (exit status "
                           f"{returncode}; its message is above)")
    if not path.exists():
        raise RuntimeError(f"pretraining finished but wrote no checkpoint at {path}")
    print(f"[compress_lit] teacher ready: {path} (reused on later runs)", flush=True)


def cached_teacher(cfg: DictConfig, dm) -> torch.nn.Module:
    """``teacher.cached=true``: the teacher's features from the cache (teachers/cache.py) instead of the network.

    The cache must have been built for this teacher (identity: name, arch, format, checkpoint path, size, mtime
    and the SHA-256 of the tensors in the file, so a swapped file is caught), exactly this train split (the fingerprint of
    its resolved samples, besides name, size, image size, normalisation) and transform (centre crop, or
    ``teacher.cache_views`` seeded views; then the training set is wrapped in ``SeededViews``). A missing cache
    is built in-process when ``teacher.build_cache_if_missing=true``; otherwise the error gives the command."""
    validate_cache_config(cfg)
    if cfg.method.name == "cc":
        raise ConfigError("method=cc clusters the teacher's network outputs itself: it does not support "
                          "teacher.cached=true (it runs the teacher only once anyway)")
    path, views = cache_path(cfg), cache_views(cfg)
    if cfg.teacher.checkpoint and cfg.teacher.format != "random":
        ensure_teacher_checkpoint(cfg.teacher)
    samples = dm.train_dataset_eval.fingerprint()  # exactly the images of this run's train split

    def expected():  # the checkpoint's weights hash is part of the teacher's identity (a swapped file is caught)
        return expected_meta(cfg.teacher, cfg.data, dm.num_train, views, seed=cfg.seed, samples=samples,
                             precision=resolved_precision(cfg.trainer))

    try:
        teacher = open_cache(path, expected())
    except CacheMissingError as e:
        if not cfg.teacher.build_cache_if_missing:
            overrides = checks.run_overrides()
            cmd = cache_features_command(overrides) if overrides is not None else \
                "python -m compress_lit.cache_features <the same overrides as this run>"
            raise TeacherCacheError(f"{e}: build it first with\n  {cmd}\nor set teacher.build_cache_if_missing=true")
        check_writable(path.parent, "the feature cache folder", cfg.safety.min_free_gb)
        print(f"[compress_lit] teacher feature cache {path} not found: computing it first", flush=True)
        device, autocast = local_device_and_autocast(cfg.trainer)
        rng = torch.random.get_rng_state()
        torch.manual_seed(cfg.seed)  # as compress_lit.cache_features (random-format teachers)
        compute_for_config(cfg, dm, device=device, autocast=autocast)
        torch.random.set_rng_state(rng)
        teacher = open_cache(path, expected())
    log.info("cached teacher %s: %s", cfg.teacher.name, teacher)
    if teacher.views > 1:
        dm.wrap_train(lambda ds: SeededViews(ds, teacher.views, teacher.base_seed))
    return teacher


def run_cache_features(cfg: DictConfig) -> dict:
    """``python -m compress_lit.cache_features``: the checks of ``compress_lit.train``, then the cache built on every
    process of the launch (Lightning Fabric); returns its meta."""
    checks.check_train_startup(cfg)  # as compress_lit.train: mandatory keys, values, the accelerator, the teacher
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
                              progress=bool(cache_setting(cfg, "progress", True)) and fabric.is_global_zero)
    if fabric.is_global_zero:
        state = "complete" if meta.get("complete") else f"incomplete ({meta.get('done')} samples; re-run to resume)"
        print(f"[compress_lit] teacher features {out}: {tuple(meta['shape'])} {meta['dtype']}, {state}\n"
              f"  train with: python -m compress_lit.train <the same overrides> teacher.cached=true"
              + (f" teacher.cache_views={meta['views']}" if meta["views"] > 1 else "")
              + (f" teacher.cache_path={out}" if OmegaConf.select(cfg, "cache.output") else ""), flush=True)
    return meta


__all__ = ["FABRIC_KEYS", "cached_teacher", "ensure_teacher_checkpoint", "run_cache_features"]
