"""Start-up checks and atomic writes: fail before any work on an unwritable or full disk, and never leave a
half-written checkpoint where a good one was.

* ``check_writable(path, what, min_free_gb)``: creates the folder, writes and removes a probe file, and checks
  the free space; a failure raises ``StartupError`` naming the path (and the free space).
* ``AtomicCheckpointIO``: Lightning checkpoint I/O that writes to a temporary file beside the target and renames
  it into place (``os.replace`` is atomic on POSIX), so a crash or a full disk mid-write leaves the previous
  checkpoint intact.
* ``atomic_write_bytes`` / ``atomic_copy``: the same for our other files (the demo teacher, results).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class StartupError(RuntimeError):
    """The run cannot start: the message names the path and the cause."""


def check_writable(path: str | Path, what: str, min_free_gb: float = 0.5) -> None:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=path)
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.unlink(probe)
    except OSError as e:
        raise StartupError(f"{what} {path} is not writable: {e.strerror or e}") from e
    free_gb = shutil.disk_usage(path).free / 2**30
    if free_gb < min_free_gb:
        raise StartupError(f"{what} {path} has only {free_gb:.2f} GiB free (need at least {min_free_gb} GiB; "
                           f"set safety.min_free_gb to change)")


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the checkpoint, then rename it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_beside(path)
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
