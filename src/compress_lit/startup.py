"""What every entry point does before any data is read or any network is built, and how a user error ends a run.

* :func:`check_mandatory`: a key left at ``???`` (``checkpoint=`` of ``evaluate``) is a ``ConfigError`` naming the
  key and what to pass, not OmegaConf's ``MissingMandatoryValue`` traceback on first access.
* :func:`check_file`: a path that must exist (``checkpoint=``, ``teacher.checkpoint=``) is named with its key.
* :func:`check_accelerator` / :func:`check_device`: ``trainer=gpu`` / ``trainer=ddp`` (or ``device=cuda``) on a
  machine without a CUDA GPU fails here, saying what to use instead, not in Lightning after the data and the
  teacher have loaded.
* :func:`run_entry`: runs an entry point's body; an error written for the user (``USER_ERRORS``) ends the command
  with one line, ``compress_lit.<entry>: <ErrorType>: <message>``, and no traceback. The error is also written
  to the run's log file, and a run directory that holds nothing but what Hydra wrote at start-up (``.hydra/``
  and the empty ``<job>.log``) is removed, so a bad value leaves no empty ``outputs/<entry>/<date>/<time>/``.
* :func:`quiet_known_noise`: warnings and log lines that say nothing to the user (the frozen teacher in eval
  mode, faiss' loader trying its optional builds, Lightning's tips).
* the ``compress_lit.options`` resolver: the options of a config group, for the ``--help`` pages
  (``conf/hydra/help/<entry>.yaml``), so the pages list exactly what the config folders hold.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

from omegaconf import OmegaConf

from .config import ConfigError
from .data import DatasetError
from .nonfinite import NonFiniteError
from .safety import StartupError
from .teachers import TeacherLoadError
from .teachers.cache import TeacherCacheError

log = logging.getLogger(__name__)
T = TypeVar("T")

# errors whose message is written for the user: shown as one line, without a traceback, by every entry point
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DatasetError, TeacherLoadError, StartupError,
                                                 TeacherCacheError, NonFiniteError)

# what to pass for a mandatory key, in the ConfigError that names it
MANDATORY_HINTS = {
    "checkpoint": "checkpoint=<path to a .ckpt file>",
    "data.root": "data.root=<folder holding train/ and val/>",
    "voc.root": "voc.root=<folder holding VOCdevkit/VOC2007>",
}


# ------------------------------------------------------------------------------------------------ checks
def check_mandatory(cfg: Any, hints: Optional[dict[str, str]] = None) -> None:
    """A ``ConfigError`` naming the first key of ``cfg`` still at ``???`` (OmegaConf's MISSING)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if not missing:
        return
    key = missing[0]
    hint = {**MANDATORY_HINTS, **(hints or {})}.get(key, f"{key}=<value>")
    others = f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""
    raise ConfigError(f"{key} is required: add {hint} to the command line{others}")


def check_file(key: str, path: Any, what: str = "file") -> None:
    """A ``ConfigError`` naming ``key`` when ``path`` (not None) is not an existing file."""
    if path is None or path == "":
        return
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        raise ConfigError(f"{key}={path}: is a folder, not a {what}")
    if not p.is_file():
        raise ConfigError(f"{key}={path}: no such {what}")


def visible_cuda_devices() -> int:
    """CUDA GPUs this process can use (Lightning's fork-safe count: no CUDA context is created)."""
    from lightning_fabric.accelerators.cuda import num_cuda_devices

    return num_cuda_devices()


def mps_available() -> bool:
    from lightning_fabric.accelerators.mps import MPSAccelerator

    return MPSAccelerator.is_available()


def check_accelerator(trainer_cfg: Any, key: str = "trainer") -> None:
    """Refuse a GPU accelerator (``trainer=gpu``, ``trainer=ddp``, ``trainer.accelerator=gpu|cuda|mps``) or more
    GPUs than there are, when this machine cannot provide them; the message names the key and the remedy."""
    if trainer_cfg is None:
        return
    accel = str(trainer_cfg.get("accelerator", "auto") or "auto").lower()
    if accel not in ("gpu", "cuda", "mps"):
        return
    use_instead = f"use {key}=cpu or {key}=default (accelerator=auto: the GPU when there is one, else the CPU)"
    if accel == "mps" or (accel == "gpu" and not visible_cuda_devices() and mps_available()):
        if not mps_available():
            raise ConfigError(f"{key}.accelerator={accel} but no Apple MPS device is available: {use_instead}")
        return
    n = visible_cuda_devices()
    if n == 0:
        raise ConfigError(f"{key}.accelerator={accel} but no CUDA GPU is visible: {use_instead}")
    devices = trainer_cfg.get("devices", "auto")
    wanted = _device_count(devices)
    if wanted is not None and wanted > n:
        raise ConfigError(f"{key}.devices={devices} asks for {wanted} GPUs but only {n} "
                          f"{'is' if n == 1 else 'are'} visible: set {key}.devices={n} (or -1: all of them)")


def _device_count(devices: Any) -> Optional[int]:
    """How many devices ``trainer.devices`` asks for on this node (None: all / auto)."""
    if isinstance(devices, str):
        s = devices.strip()
        if s in ("auto", "-1", ""):
            return None
        if "," in s:
            return len([d for d in s.split(",") if d.strip()])
        if s.lstrip("-").isdigit():
            devices = int(s)
        else:
            return None
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return None if devices < 0 else devices
    try:  # a list of device indices
        return max(int(d) for d in devices) + 1
    except (TypeError, ValueError):
        return None


def check_device(device: Any, key: str = "device") -> None:
    """``device=cuda`` / ``cuda:N`` / ``mps`` (the evaluation entry points) on a machine that does not have it."""
    d = str(device or "auto").lower()
    if d.startswith("cuda"):
        n = visible_cuda_devices()
        idx = int(d.split(":", 1)[1]) if ":" in d and d.split(":", 1)[1].isdigit() else 0
        if idx >= n:
            raise ConfigError(f"{key}={device} but {'no CUDA GPU is' if not n else f'only {n} CUDA GPU(s) are'} "
                              f"visible: use {key}=auto or {key}=cpu")
    elif d == "mps" and not mps_available():
        raise ConfigError(f"{key}={device} but no Apple MPS device is available: use {key}=auto or {key}=cpu")


# ------------------------------------------------------------------------------------------------ noise
class _NoTips(logging.Filter):
    """Drops Lightning's advertising lines ("💡 Tip: ... try installing ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_noise() -> None:
    """Silence what says nothing to the user: Lightning's eval-mode warning (the frozen teacher and an evaluated
    backbone are in eval mode on purpose), faiss' loader INFO lines (it tries its optional AVX builds), Lightning's
    tips, and the hook overrides that are ours on purpose."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in lg.filters):
            lg.addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*overridden `on_(before|after)_batch_transfer`.*")  # on purpose
    warnings.filterwarnings("ignore", message=r".*no `validation_step`.*")  # val data is for the evaluations
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    logging.getLogger("faiss").setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------------- run dirs
def hydra_run_dir() -> Optional[Path]:
    """This Hydra job's output directory (None outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return Path(HydraConfig.get().runtime.output_dir)


def _run_log_handlers(run_dir: Path) -> list[tuple[logging.Logger, logging.FileHandler]]:
    """The file handlers writing into ``run_dir`` (Hydra's ``<job>.log``), with the logger holding each."""
    out = []
    loggers = [logging.getLogger(), *[lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger)]]
    root = run_dir.resolve()
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve().parent == root:
                out.append((lg, h))
    return out


def write_to_run_log(run_dir: Path, message: str, name: str = "compress_lit", level: int = logging.ERROR) -> None:
    """Append ``message`` to the run's log file(s) only (the console already shows it)."""
    record = logging.LogRecord(name, level, __file__, 0, message, None, None)
    for _, h in _run_log_handlers(run_dir):
        h.handle(record)


def holds_only_hydra_files(run_dir: Path) -> bool:
    """True when ``run_dir`` holds nothing but what Hydra writes at start-up: ``.hydra/`` and ``*.log`` files (and
    the run folder's lock, ``runtime/run_folder.py``)."""
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return False
    if not any(e.name == ".hydra" and e.is_dir() for e in entries):
        return False
    return all((e.name == ".hydra" and e.is_dir()) or (e.is_file() and (e.suffix == ".log" or e.name == ".run.lock"))
               for e in entries)


def close_run_log(run_dir: Path) -> None:
    """Detach and close the log file handlers writing into ``run_dir``."""
    for lg, h in _run_log_handlers(run_dir):
        lg.removeHandler(h)
        h.close()


def remove_if_only_hydra_files(run_dir: Optional[Path]) -> bool:
    """Remove ``run_dir`` when it holds nothing but Hydra's start-up files (a run that ended before it wrote
    anything); returns whether it was removed."""
    if run_dir is None or not holds_only_hydra_files(Path(run_dir)):
        return False
    close_run_log(Path(run_dir))
    shutil.rmtree(run_dir, ignore_errors=True)
    return not Path(run_dir).exists()


def run_entry(entry: str, body: Callable[[], T], run_dir: Optional[Path] = None,
              user_errors: Iterable[type[BaseException]] = USER_ERRORS) -> T:
    """Run an entry point's ``body``. A user error (``user_errors``) is written to the run's log, the run
    directory is removed when it holds nothing but Hydra's start-up files, and the command ends with exit status
    1 and one line on stderr: ``compress_lit.<entry>: <ErrorType>: <message>``."""
    quiet_known_noise()
    run_dir = Path(run_dir) if run_dir is not None else hydra_run_dir()
    from .runtime import run_folder

    try:
        return body()
    except tuple(user_errors) as e:
        line = f"compress_lit.{entry}: {type(e).__name__}: {e}"
        if run_dir is not None and run_dir.exists():
            write_to_run_log(run_dir, line, name=f"compress_lit.{entry}")
            if not isinstance(e, run_folder.RunFolderInUse):  # the folder is the other run's
                run_folder.abandon()  # a folder this run continued gets its earlier .hydra/ back
                remove_if_only_hydra_files(run_dir)
        sys.exit(line)
    finally:
        run_folder.release_all()


# ------------------------------------------------------------------------------------------- --help pages
def group_options(group: str) -> str:
    """``a, b, c`` (sub-folders as ``sub/a``): the options of config group ``group`` in Hydra's search path."""
    try:
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.object_type import ObjectType

        gh = GlobalHydra.instance()
        if not gh.is_initialized():
            return f"see conf/{group}/"
        loader = gh.config_loader()

        def walk(g: str, prefix: str = "") -> list[str]:
            names = [prefix + o for o in loader.get_group_options(g, ObjectType.CONFIG)]
            for sub in loader.get_group_options(g, ObjectType.GROUP):
                names += walk(f"{g}/{sub}", f"{prefix}{sub}/")
            return names

        return ", ".join(walk(group)) or f"(none in conf/{group}/)"
    except Exception:  # noqa: BLE001 - a help line must never fail the help page
        return f"see conf/{group}/"


if not OmegaConf.has_resolver("compress_lit.options"):
    OmegaConf.register_new_resolver("compress_lit.options", group_options)


__all__ = ["USER_ERRORS", "check_accelerator", "check_device", "check_file", "check_mandatory", "group_options",
           "holds_only_hydra_files", "hydra_run_dir", "quiet_known_noise", "remove_if_only_hydra_files",
           "run_entry", "visible_cuda_devices", "write_to_run_log"]
