"""Which checkpoint a run resumes from: ``resume=null`` (none), a ``.ckpt`` path, a run dir, or ``auto``.

``auto`` first looks in this run's own directory: a job that SLURM requeued into the same directory finds the
checkpoint Lightning saved when the requeue signal came (``hpc_ckpt_<n>.ckpt``, written mid-epoch on SIGUSR1) or
its ``checkpoints/last.ckpt``, and continues from the newer of them. Otherwise it looks through earlier Hydra run
dirs beside this one (``outputs/<date>/<time>`` or a multirun's ``multirun/<date>/<time>/<n>``) for the newest
``checkpoints/last.ckpt`` whose saved config (``.hydra/config.yaml``) equals this run's, the ``resume`` key aside,
so a re-launched job continues its own run and never another's.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def _config_without_resume(path: Path):
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    cfg.pop("resume", None)
    return cfg


def find_auto_checkpoint(run_dir: Path) -> Path | None:
    mine = run_dir / ".hydra" / "config.yaml"
    if not mine.exists():
        raise FileNotFoundError(f"resume=auto needs this run's Hydra config at {mine}")
    target = _config_without_resume(mine)
    # outputs/<date>/<time> → outputs;  multirun/<date>/<time>/<job number> → multirun
    root = run_dir.parents[2] if run_dir.name.isdigit() else run_dir.parents[1]
    candidates = []
    for ckpt in root.glob("**/checkpoints/last.ckpt"):
        d = ckpt.parent.parent
        if d.resolve() == run_dir.resolve() or not (d / ".hydra" / "config.yaml").exists():
            continue
        if _config_without_resume(d / ".hydra" / "config.yaml") == target:
            candidates.append(ckpt)
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)


def own_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint already in this run's directory (a requeued job): Lightning's ``hpc_ckpt_*.ckpt``
    (saved on the SLURM requeue signal) or ``checkpoints/last.ckpt``."""
    found = [*run_dir.glob("hpc_ckpt_*.ckpt"), *(run_dir / "checkpoints").glob("last.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_resume(resume: str | None, run_dir: str | Path) -> str | None:
    if not resume:
        return None
    run_dir = Path(run_dir)
    if resume == "auto":
        own = own_checkpoint(run_dir)
        if own is not None:
            log.info("resume=auto: resuming from %s (this run directory's own checkpoint: a requeued job)", own)
            return str(own)
        found = find_auto_checkpoint(run_dir)
        if found is None:
            log.info("resume=auto: no earlier run with this config has a checkpoint; starting fresh")
            return None
        log.info("resume=auto: resuming from %s", found)
        return str(found)
    p = Path(resume)
    if p.is_dir():
        p = p / "checkpoints" / "last.ckpt"
    if not p.is_file():
        raise FileNotFoundError(f"resume={resume!r}: no checkpoint at {p}")
    return str(p)


def collect_rng_states() -> dict:
    """Every global RNG a step draws from (data order, augmentations, dropout), to store in a checkpoint."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict | None) -> None:
    """Put the RNGs back where the checkpoint left them, so a resumed run draws what the uninterrupted one did."""
    if not states:
        return
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
