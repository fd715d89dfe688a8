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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

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


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    with atomic_target(dst) as tmp:
        shutil.copyfile(src, tmp)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the checkpoint, then rename it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_target(path) as tmp:
            torch.save(checkpoint, tmp)
