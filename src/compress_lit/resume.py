"""Which checkpoint a run resumes from, and where the resumed run writes.

``resume=`` takes ``null`` (none), a ``.ckpt`` path, a run dir (its ``checkpoints/last.ckpt``), or ``auto``.
A path that is not there is refused at start-up (``ConfigError`` naming ``resume`` and the path), before any
data is read or any network is built.

``auto`` first looks in this run's own directory: a job that SLURM requeued into the same directory finds the
checkpoint Lightning saved when the requeue signal came (``hpc_ckpt_<n>.ckpt``, written mid-epoch on SIGUSR1) or
its ``checkpoints/last.ckpt``, and continues from the newer of them. Otherwise it looks through earlier Hydra run
dirs beside this one (``outputs/<entry>/<date>/<time>`` or a multirun's ``multirun/<entry>/<date>/<time>/<n>``)
for the newest ``checkpoints/last.ckpt`` whose saved config (``.hydra/config.yaml``) equals this run's, the
``resume`` key aside, so a re-launched job continues its own run and never another's.

Where a resumed run writes (:func:`prepare_resume`):

* ``resume=auto`` continues **in the original run directory**, the one holding the checkpoint: its checkpoints,
  ``csv/metrics.csv``, ``learning_curves.png``, results, pictures and ``<job>.log`` (appended to) stay one run's
  record. The directory Hydra had just created for the re-launch (``.hydra/`` and an empty log only) is
  removed; the original's ``.hydra/`` is kept (its config is this run's, the ``resume`` key aside).
* ``metrics.csv`` keeps the rows logged before the checkpoint's step; the rows of the steps after it, which the
  killed run logged and the resumed run logs again, are dropped, so every step appears once.
* ``resume=<path>`` (a checkpoint or a run dir named explicitly) starts a new run directory, as any run does:
  the checkpoint may come from anywhere, and the config may differ on purpose (more epochs).
"""
from __future__ import annotations

import csv
import logging
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from .config import ConfigError

log = logging.getLogger(__name__)


def _config_without_resume(path: Path):
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    cfg.pop("resume", None)
    return cfg


def find_auto_checkpoint(run_dir: Path) -> Path | None:
    mine = run_dir / ".hydra" / "config.yaml"
    if not mine.exists():
        raise ConfigError(f"resume=auto needs this run's Hydra config at {mine} (run it through the command line, "
                          f"or pass resume=<checkpoint or run dir>)")
    target = _config_without_resume(mine)
    # outputs/<entry>/<date>/<time> → outputs/<entry>;
    # multirun/<entry>/<date>/<time>/<job number> → multirun/<entry>
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
    """The checkpoint to resume from (None: start fresh); a ``ConfigError`` naming ``resume`` when a path given
    explicitly holds no checkpoint."""
    return _resolve(resume, Path(run_dir))[0]


def _resolve(resume: str | None, run_dir: Path) -> tuple[str | None, Path]:
    """(checkpoint or None, the directory the run writes to)."""
    if not resume:
        return None, run_dir
    if resume == "auto":
        own = own_checkpoint(run_dir)
        if own is not None:
            log.info("resume=auto: resuming from %s (this run directory's own checkpoint: a requeued job)", own)
            return str(own), run_dir
        found = find_auto_checkpoint(run_dir)
        if found is None:
            log.info("resume=auto: no earlier run with this config has a checkpoint; starting fresh")
            return None, run_dir
        log.info("resume=auto: resuming from %s", found)
        return str(found), found.parent.parent
    p = Path(resume).expanduser()
    target = p / "checkpoints" / "last.ckpt" if p.is_dir() else p
    if not target.is_file():
        raise ConfigError(f"resume={resume}: no checkpoint at {target} (pass resume=auto, a .ckpt file or a run "
                          f"directory holding checkpoints/last.ckpt)")
    return str(target), run_dir


@dataclass
class Resume:
    """Where a run starts from: ``checkpoint`` (None: fresh), the ``run_dir`` it writes to (the original run's
    directory for ``resume=auto``), and the ``metrics.csv`` rows logged there before the checkpoint's step
    (``history``; the CSV logger writes them back first, see ``loggers.build_logger``)."""
    checkpoint: str | None
    run_dir: Path
    history: list[dict[str, str]] = field(default_factory=list)


def prepare_resume(resume: str | None, run_dir: str | Path) -> Resume:
    """Resolve ``resume`` for the run Hydra started in ``run_dir`` (see the module docstring): with
    ``resume=auto`` and an earlier run's checkpoint, the run moves into that run's directory (Hydra's log file
    follows, appending; the fresh directory is removed when it holds only Hydra's start-up files). When the
    checkpoint lies in the directory the run writes to, the ``metrics.csv`` rows before its step are taken as
    ``history`` (and the file removed, so that the CSV logger starts clean and writes them back)."""
    fresh = Path(run_dir)
    ckpt, target = _resolve(resume, fresh)
    if target.resolve() != fresh.resolve():
        continue_in(target, fresh)
    history = []
    if ckpt is not None and _inside(Path(ckpt), target):
        history = take_metrics_history(target, checkpoint_step(ckpt))
        # the run's own checkpoints are there on purpose: Lightning's "not empty" warning would only confuse
        ckpt_dir = os.path.realpath(target / "checkpoints")  # as ModelCheckpoint names it
        warnings.filterwarnings("ignore", message=re.escape(f"Checkpoint directory {ckpt_dir} exists and is not empty"))
    return Resume(ckpt, target, history)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def continue_in(original: Path, fresh: Path) -> None:
    """Point Hydra's job log at ``original`` (appending) and remove ``fresh`` if Hydra's start-up files are all it
    holds."""
    from .startup import _run_log_handlers, remove_if_only_hydra_files

    for lg, h in _run_log_handlers(fresh):
        moved = logging.FileHandler(original / Path(h.baseFilename).name, mode="a", encoding=h.encoding)
        moved.setLevel(h.level)
        moved.setFormatter(h.formatter)
        for f in h.filters:
            moved.addFilter(f)
        lg.addHandler(moved)
        lg.removeHandler(h)
        h.close()
    log.info("resume=auto: continuing the run in %s (this launch's directory %s is not used)", original, fresh)
    remove_if_only_hydra_files(fresh)


def checkpoint_step(ckpt: str | Path) -> int:
    """The ``global_step`` a Lightning checkpoint was saved at (read lazily: the tensors are memory-mapped)."""
    try:
        obj = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)  # trusted: our own checkpoint
    except RuntimeError:  # not a zip-format file: no mmap
        obj = torch.load(ckpt, map_location="cpu", weights_only=False)
    return int(obj.get("global_step", 0))


def take_metrics_history(run_dir: Path, before_step: int) -> list[dict[str, str]]:
    """The rows of ``<run_dir>/csv/metrics.csv`` logged before ``before_step`` (their non-empty cells), removing
    the file and the CSV logger's ``hparams.yaml`` beside it (rewritten by the resumed run)."""
    from .reporting import find_metrics_csv

    path = find_metrics_csv(run_dir)
    if path is None:
        return []
    with open(path, newline="") as f:
        rows = [{k: v for k, v in r.items() if k is not None and v not in (None, "")} for r in csv.DictReader(f)]
    # an end-of-run results row (eval/<model>/<metric>, see reporting.log_results) belongs to the finished part
    kept = [r for r in rows if _step(r) < before_step and not any(k.startswith("eval/") and k.count("/") > 1
                                                                  for k in r)]
    path.unlink()
    hparams = path.parent / "hparams.yaml"
    if hparams.is_file():
        hparams.unlink()
    log.info("resume: keeping %d of %d rows of %s (the steps before %d)", len(kept), len(rows), path, before_step)
    return kept


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step", "inf"))
    except ValueError:
        return float("inf")


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
