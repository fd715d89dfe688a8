"""Start-up checks and atomic writes: fail before any work on an unwritable or full disk, and never leave a
half-written checkpoint where a good one was.

* ``check_writable(path, what, min_free_gb)``: creates the folder, writes and removes a probe file, and checks
  the free space; a failure raises ``StartupError`` naming the path (and the free space).
* ``AtomicCheckpointIO``: Lightning checkpoint I/O that writes to a temporary file beside the target and renames
  it into place (``os.replace`` is atomic on POSIX), so a crash or a full disk mid-write leaves the previous
  checkpoint intact.
* ``atomic_write_bytes`` / ``atomic_copy``: the same for our other files (the demo teacher, results).
* ``load_torch_file``: every torch file a user passes is read with ``torch.load(weights_only=True)``: tensors and
  plain containers only, so a malicious pickle is refused before any of it runs (``UnsafeFileError``).
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

from .config import ConfigError


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


class DiskFullError(StartupError):
    """A write failed for lack of space; the message names the file and the free space."""


def _is_disk_full(e: BaseException, folder: Path) -> bool:
    """ENOSPC/EDQUOT, or torch's zip writer failing (it reports a full disk as ``file write failed`` without the
    errno) where the folder's free space is nearly gone."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(e, RuntimeError) and "write failed" in str(e):
        try:
            return shutil.disk_usage(folder).free < 64 * 2**20
        except OSError:
            return False
    return False


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the checkpoint, then rename it into place. A full disk is one
    :class:`DiskFullError` naming the checkpoint and the free space; the previous checkpoint stays intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        try:
            with atomic_target(path) as tmp:
                torch.save(checkpoint, tmp)
        except (OSError, RuntimeError) as e:
            folder = Path(path).parent
            if not _is_disk_full(e, folder):
                raise
            free = shutil.disk_usage(folder).free / 2**30
            raise DiskFullError(f"disk full while writing the checkpoint {path} ({free:.2f} GiB free in {folder}): "
                                f"the previous checkpoint is intact; free space and continue with resume=auto") \
                from None


# ------------------------------------------------------------------------------------------------------------
# reading a torch file a user passes: never a full unpickle
# ------------------------------------------------------------------------------------------------------------
class CheckpointFileError(ConfigError):
    """A file given by a key (``checkpoint=``, ``resume=``, ``teacher.checkpoint=``) that cannot be used: the
    message names the key and the path."""


class UnsafeFileError(CheckpointFileError):
    """A torch file whose pickle needs Python objects beyond tensors and plain containers: it could run code when
    loaded, so it is refused, never unpickled."""


class UnreadableFileError(CheckpointFileError):
    """A file that is not a readable torch file (truncated, corrupt, text), or no file at all."""


def _numpy_array_globals() -> list:
    """What the numpy RNG state of checkpoints written before plain-container RNG states needs: the array
    reconstruction of a uint32 array. No object dtype: an object array could carry arbitrary objects."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_torch_file(path: str | os.PathLike, key: str, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, plain containers and numbers (and the uint32 numpy array
    of older checkpoints' RNG state) only. A file needing anything else (a pickled class, a function: a pickle's
    ``__reduce__`` can run any code) raises :class:`UnsafeFileError` naming ``key``, the path and the refused
    names, before any of it runs; a truncated or foreign file raises :class:`UnreadableFileError`. ``mmap``: the
    tensors are memory-mapped (only the structure is read) where the file is a zip-format torch file."""
    import pickle

    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        raise UnreadableFileError(f"{key}={path}: is a folder, not a checkpoint file")
    if not p.is_file():
        raise UnreadableFileError(f"{key}={path}: no such file" + (" (a dangling link)" if p.is_symlink() else ""))
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            try:
                return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not mmap or "zip" not in str(e).lower():
                    raise
                return torch.load(p, map_location="cpu", weights_only=True)  # legacy (non-zip) format: no mmap
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "weights_only" in text.lower() or "Weights only load failed" in text:
            raise UnsafeFileError(
                f"{key}={path}: refused: the file holds Python objects beyond tensors and plain containers "
                f"({refused_names(p)}); unpickling them could run code, so compress_lit never does. If you trust "
                f"the file, save its tensors alone (torch.save(obj['state_dict'], 'weights.pth')) and pass that"
            ) from None
        raise UnreadableFileError(f"{key}={path}: not a readable checkpoint (truncated, corrupt or not a torch "
                                  f"file): {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - any other failure means "not readable"; the cause goes in the message
        raise UnreadableFileError(f"{key}={path}: not a readable checkpoint (truncated, corrupt or not a torch "
                                  f"file): {_first_line(e)}") from None


def refused_names(path: Path) -> str:
    """The globals a weights-only load refuses in ``path`` (read without running anything)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - a legacy-format file: torch cannot list them
        return "not listed: a legacy-format file"
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "") if names else "unnamed objects"


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".strip()
