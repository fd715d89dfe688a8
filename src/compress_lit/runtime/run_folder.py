"""One run per run folder.

Two runs started into one ``hydra.run.dir`` would interleave their ``metrics.csv``, overwrite each other's
checkpoints and lose a ``results.json``. A training entry point therefore *claims* its folder before it writes
anything: an exclusive ``flock`` on ``<run_dir>/.run.lock``, held for the life of the process. The operating system
drops the lock when the process dies, so a run killed with SIGKILL leaves nothing stuck. The lock file also
records its owner (pid, host, start time) and the owner's ``.hydra/`` files: Hydra writes the second run's
``.hydra/`` before any of our code runs, and the refused run puts the owner's back.

* A folder whose lock another process holds is refused (``RunFolderInUse``), naming the folder and the owner.
* A folder that already holds a run's checkpoints is refused for a new run (``resume`` not set): continue it with
  ``resume=auto``, or choose another folder.
* Temporary files of a checkpoint write killed midway (``.<name>.tmp<pid>``) are removed once the folder is
  claimed (no other process can be writing them then).

Only the main process claims: DDP's worker processes (``LOCAL_RANK``/``RANK``/``NODE_RANK``/``SLURM_PROCID`` not
0) share their launcher's folder.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from .safety import StartupError

log = logging.getLogger(__name__)
LOCK_NAME = ".run.lock"
_held: dict[str, int] = {}  # resolved folder -> the open, locked file descriptor
_previous: dict[str, tuple[Path, dict]] = {}  # resolved folder -> (folder, the record of the run before this one)


class RunFolderInUse(StartupError):
    """The run folder belongs to another run (running now, or finished there before)."""


def is_main_process() -> bool:
    return all(os.environ.get(k, "0") in ("", "0") for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _read_record(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(fd, 1 << 16):
            data += chunk
        return json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def _hydra_files(run_dir: Path) -> dict[str, str]:
    folder = run_dir / ".hydra"
    return {p.name: p.read_text() for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def _restore_hydra(run_dir: Path, record: dict) -> None:
    """Put the owner's ``.hydra/`` files back (Hydra has just overwritten them with the refused run's)."""
    for name, text in (record.get("hydra") or {}).items():
        try:
            (run_dir / ".hydra" / name).write_text(text)
        except OSError as e:  # the refusal is what matters; say what could not be put back
            log.warning("could not restore %s: %s", run_dir / ".hydra" / name, e)


def holds_a_run(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a run's results: a checkpoint (epoch, last or SIGTERM/requeue) or results."""
    ckpts = run_dir / "checkpoints"
    return (ckpts.is_dir() and any(p.suffix == ".ckpt" and not p.name.startswith(".") for p in ckpts.iterdir())) \
        or any(run_dir.glob("hpc_ckpt_*.ckpt")) or (run_dir / "results.json").is_file()


def remove_orphan_temporaries(run_dir: Path) -> list[Path]:
    """Remove the ``.<name>.tmp<pid>`` files a killed checkpoint write left (see ``safety.atomic_target``)."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        for p in folder.glob(".*.tmp[0-9]*") if folder.is_dir() else ():
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) of a checkpoint write that was killed midway: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def claim(run_dir: str | Path, resuming: bool) -> None:
    """Claim ``run_dir`` for this process (see the module docstring); ``resuming``: this run continues the run
    already in the folder (``resume=`` set), so its checkpoints are expected there."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held or not is_main_process():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = _read_record(fd)
        os.close(fd)
        _restore_hydra(run_dir, owner)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"])) if "started" in owner else "?"
        raise RunFolderInUse(
            f"hydra.run.dir={run_dir} is in use by another run (pid {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')}, since {since}): two runs in one folder would mix their checkpoints and "
            f"logs; choose another hydra.run.dir, or pass resume=auto once that run has stopped") from None
    previous = _read_record(fd)
    if not resuming and holds_a_run(run_dir):
        _restore_hydra(run_dir, previous)
        os.close(fd)
        raise RunFolderInUse(f"hydra.run.dir={run_dir} already holds a run (its checkpoints or results): continue "
                             f"it with resume=auto, or choose another hydra.run.dir for a new run") from None
    remove_orphan_temporaries(run_dir)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "hydra": _hydra_files(run_dir)}
    _write_record(fd, record)
    _held[key] = fd
    if previous.get("hydra"):
        _previous[key] = (run_dir, previous)


def abandon() -> None:
    """This process's run failed with a user error: the folders it claimed get their earlier run's ``.hydra/``
    back (Hydra had overwritten it with this run's), so a refused ``resume=auto`` changes nothing there."""
    for key, (run_dir, previous) in list(_previous.items()):
        if key in _held and run_dir.is_dir():
            _restore_hydra(run_dir, previous)
            _write_record(_held[key], previous)  # the folder's owner is the earlier run again
    _previous.clear()


def _write_record(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode())


def release_all() -> None:
    """Unlock every folder this process claimed (the end of an entry point; process exit does it too)."""
    _previous.clear()
    while _held:
        _, fd = _held.popitem()
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        except OSError:
            pass


__all__ = ["LOCK_NAME", "RunFolderInUse", "abandon", "claim", "holds_a_run", "is_main_process", "release_all",
           "remove_orphan_temporaries"]
