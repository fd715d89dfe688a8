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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from .config import ConfigError
from .safety import UnreadableFileError, load_torch_file

log = logging.getLogger("compress_lit.resume")  # the name it always had


def _config_without_resume(path: Path):
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    cfg.pop("resume", None)
    return cfg


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    """``ckpt_dir/last.ckpt`` when it is (or links to) a file; else, when it is missing or dangling (a write killed
    between the epoch checkpoint and the link), the newest epoch checkpoint there. Temporary files of a killed
    write (``.<name>.tmp<pid>``) are never candidates."""
    last = ckpt_dir / "last.ckpt"
    if last.is_file():
        return last
    epochs = [p for p in ckpt_dir.glob("*.ckpt") if p.is_file() and not p.name.startswith(".") and p != last]
    if not epochs:
        return None
    newest = max(epochs, key=lambda p: p.stat().st_mtime)
    log.info("resume: %s is %s; using the newest epoch checkpoint %s", last,
             "a dangling link" if last.is_symlink() else "missing", newest.name)
    return newest


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
    for ckpt_dir in root.glob("**/checkpoints"):
        d = ckpt_dir.parent
        if d.resolve() == run_dir.resolve() or not (d / ".hydra" / "config.yaml").exists():
            continue
        found = newest_checkpoint(ckpt_dir)
        if found is not None and _config_without_resume(d / ".hydra" / "config.yaml") == target:
            candidates.append(found)
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)


def own_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint already in this run's directory (a requeued job): Lightning's ``hpc_ckpt_*.ckpt``
    (saved on the SLURM requeue signal or on SIGTERM) or ``checkpoints/last.ckpt`` (or the newest epoch
    checkpoint when that link is missing or dangling)."""
    found = [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if p.is_file()]
    newest = newest_checkpoint(run_dir / "checkpoints")
    found += [newest] if newest is not None else []
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
    (``history``, None when the run does not continue a CSV log in place; the CSV logger writes them back when it
    first writes, see ``loggers.build_logger``, so a resume that fails before that leaves the file as it was)."""
    checkpoint: str | None
    run_dir: Path
    history: list[dict[str, str]] | None = None
    teacher_fingerprint: str | None = None  # the teacher the checkpoint was trained with (distillation runs)

    def check_teacher(self, fingerprint: str) -> None:
        """A ``ConfigError`` when the checkpoint was trained with another teacher (before anything is written)."""
        if self.teacher_fingerprint is not None and self.teacher_fingerprint != fingerprint:
            raise ConfigError(f"resume: {self.checkpoint} was trained with another teacher (fingerprint "
                              f"{self.teacher_fingerprint}, this run's teacher {fingerprint}): resume with the "
                              f"teacher the run started with; nothing was changed")


def prepare_resume(resume: str | None, run_dir: str | Path, config: dict | None = None) -> Resume:
    """Resolve ``resume`` for the run Hydra started in ``run_dir`` (see the module docstring). The checkpoint is
    read first (weights only: a malicious, truncated or foreign file is one ``ConfigError`` naming ``resume``),
    and with ``resume=auto`` its stored config must be ``config`` (this run's resolved config, the ``resume`` key
    aside): another run's checkpoint is refused naming the keys that differ. Only then does anything change on
    disk: with ``resume=auto`` and an earlier run's checkpoint, the run moves into that run's directory (Hydra's
    log file follows, appending; the fresh directory is removed when it holds only Hydra's start-up files); when
    the checkpoint lies in the directory the run writes to, the ``metrics.csv`` rows before its step are read as
    ``history`` (the file itself is replaced only when the resumed run first logs)."""
    fresh = Path(run_dir)
    ckpt, target = _resolve(resume, fresh)
    if ckpt is None:
        return Resume(None, target)
    saved = read_resume_checkpoint(ckpt)
    if resume == "auto" and config is not None:
        check_same_config(ckpt, saved, config)
    if target.resolve() != fresh.resolve():
        from . import run_folder

        run_folder.claim(target, resuming=True)  # refused while another process runs there
        continue_in(target, fresh)
    history = None
    if _inside(Path(ckpt), target):
        history = metrics_history(target, int(saved.get("global_step", 0)))
        # the run's own checkpoints are there on purpose: Lightning's "not empty" warning would only confuse
        ckpt_dir = os.path.realpath(target / "checkpoints")  # as ModelCheckpoint names it
        warnings.filterwarnings("ignore", message=re.escape(f"Checkpoint directory {ckpt_dir} exists and is not empty"))
    return Resume(ckpt, target, history, saved.get("teacher_fingerprint"))


def check_same_config(ckpt: str | Path, saved: dict, config: dict) -> None:
    """``resume=auto`` continues a run only with that run's own config: a ``ConfigError`` naming the keys in which
    the checkpoint's stored config (``hyper_parameters.config``) differs from ``config``."""
    stored = (saved.get("hyper_parameters") or {}).get("config")
    if not isinstance(stored, dict):
        return  # a checkpoint of an older version without a stored config: the Hydra config matched
    a, b = _flat({k: v for k, v in stored.items() if k != "resume"}), _flat({k: v for k, v in config.items()
                                                                              if k != "resume"})
    differ = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    if differ:
        shown = ", ".join(f"{k} ({a.get(k, '<absent>')!r} there, {b.get(k, '<absent>')!r} now)" for k in differ[:3])
        raise ConfigError(f"resume=auto: {ckpt} belongs to a run with another config ({shown}"
                          f"{f' and {len(differ) - 3} more' if len(differ) > 3 else ''}): nothing was changed; "
                          f"run with that run's settings, pass resume=<that checkpoint> to continue it with these, "
                          f"or choose another hydra.run.dir")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


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


def read_resume_checkpoint(ckpt: str | Path, key: str = "resume") -> dict:
    """The checkpoint a run resumes from, read weights-only and memory-mapped (``safety.load_torch_file``): a
    malicious, truncated or foreign file is one ``ConfigError`` naming ``key`` before Lightning touches it."""
    obj = load_torch_file(ckpt, key, mmap=True)
    if not isinstance(obj, dict) or not {"state_dict", "global_step", "epoch"} <= set(obj):
        raise UnreadableFileError(f"{key}={ckpt}: not a Lightning checkpoint of a compress_lit run (no state_dict, "
                                  f"epoch and global_step)")
    return obj


def metrics_history(run_dir: Path, before_step: int) -> list[dict[str, str]]:
    """The rows of ``<run_dir>/csv/metrics.csv`` logged before ``before_step`` (their non-empty cells). Nothing is
    removed here: the resumed run's CSV logger replaces the file (and ``hparams.yaml``) when it first writes."""
    from ..reporting.end_of_run import find_metrics_csv

    path = find_metrics_csv(run_dir)
    if path is None:
        return []
    with open(path, newline="") as f:
        rows = [{k: v for k, v in r.items() if k is not None and v not in (None, "")} for r in csv.DictReader(f)]
    # an end-of-run results row (eval/<model>/<metric>, see reporting.log_results) belongs to the finished part
    kept = [r for r in rows if _step(r) < before_step and not any(k.startswith("eval/") and k.count("/") > 1
                                                                  for k in r)]
    log.info("resume: keeping %d of %d rows of %s (the steps before %d)", len(kept), len(rows), path, before_step)
    return kept


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step", "inf"))
    except ValueError:
        return float("inf")


def collect_rng_states() -> dict:
    """Every global RNG a step draws from (data order, augmentations, dropout), to store in a checkpoint."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's state as plain values (a tensor for its keys): the checkpoint loads with weights_only=True
    states = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                        int(has_gauss), float(gauss)], "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict | None) -> None:
    """Put the RNGs back where the checkpoint left them, so a resumed run draws what the uninterrupted one did."""
    if not states:
        return
    torch.set_rng_state(states["torch"])
    name, keys, *rest = states["numpy"]  # a tensor (this format) or a uint32 array (checkpoints before it)
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
