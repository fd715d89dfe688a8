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
* :func:`one_line_hydra_errors`: Hydra's own errors about the command line (a misspelt key, a group option that
  does not exist, a value Hydra cannot parse) become one line naming the argument, with the closest valid keys or
  options ("did you mean method.temperature?") and, for a value with ``=`` or other punctuation, how to quote it.
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
from ..data import DatasetError
from .nonfinite import NonFiniteError
from .safety import StartupError
from ..teachers import TeacherLoadError
from ..teachers.cache import TeacherCacheError

log = logging.getLogger("compress_lit.startup")  # the name it always had
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


_output_dir: Optional[Path] = None  # where the entry point wrote, when that is not Hydra's run folder


def set_output_dir(path: str | Path) -> None:
    """Tell :func:`run_entry` where this command's output went (``resume=auto`` continuing an earlier run's
    folder, export's output folder), for its closing line."""
    global _output_dir
    _output_dir = Path(path)


TRAINING_ENTRIES = ("train", "pretrain")  # what ``resume=auto`` continues
QUIET_INTERRUPT = "COMPRESS_LIT_STEP_OF"  # set for a command run as a step of another: Ctrl-C is reported there


def run_entry(entry: str, body: Callable[[], T], run_dir: Optional[Path] = None,
              user_errors: Iterable[type[BaseException]] = USER_ERRORS) -> T:
    """Run an entry point's ``body`` with the torch threads the free cores allow (``runtime/threads.py``), then
    say where it wrote (``compress_lit.<entry>: wrote <folder>``). A user error (``user_errors``) is written to the
    run's log, the run directory is removed when it holds nothing but Hydra's start-up files, and the command ends
    with exit status 1 and one line on stderr: ``compress_lit.<entry>: <ErrorType>: <message>``. Ctrl-C ends in one
    line too (exit status 130): the folder, and for training the ``resume=auto`` line that continues it."""
    from . import run_folder
    from .threads import choose_threads

    global _output_dir
    _output_dir = None
    quiet_known_noise()
    choose_threads()
    run_dir = Path(run_dir) if run_dir is not None else hydra_run_dir()
    try:
        result = body()
    except tuple(user_errors) as e:
        line = f"compress_lit.{entry}: {type(e).__name__}: {e}"
        if run_dir is not None and run_dir.exists():
            write_to_run_log(run_dir, line, name=f"compress_lit.{entry}")
            if not isinstance(e, run_folder.RunFolderInUse):  # the folder is the other run's
                run_folder.abandon()  # a folder this run continued gets its earlier .hydra/ back
                remove_if_only_hydra_files(run_dir)
        sys.exit(line)
    except KeyboardInterrupt as e:
        if os.environ.get(QUIET_INTERRUPT):  # a step of another command (the demo teacher's pretraining): it says
            sys.exit(130)
        where = _output_dir or run_dir
        line = f"compress_lit.{entry}: interrupted (Ctrl-C)"
        kept = where is not None and where.exists() and not remove_if_only_hydra_files(where)
        if kept:
            write_to_run_log(where, line, name=f"compress_lit.{entry}", level=logging.WARNING)
            line += f"; its folder is {where}"
        if e.args:
            line += f"; {e.args[0]}"
        elif entry in TRAINING_ENTRIES and kept:
            line += "; run the same command with resume=auto to continue"
        print(line, file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        run_folder.release_all()
    where = _output_dir or run_dir
    if where is not None and where.exists():
        print(f"compress_lit.{entry}: wrote {where}", flush=True)
    return result


# ------------------------------------------------------------------------------------ Hydra's own errors
def _entry_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None and spec.name else "compress_lit"


def _flat_keys(cfg: Any, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        out.append(key)
        if OmegaConf.is_dict(v):
            out += _flat_keys(v, key + ".")
    return out


def _config_keys(config_name: str, args: list[str]) -> list[str]:
    """Every dotted key of ``config_name`` composed with the command line's group choices (``method=seed``)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    choices = [a for a in args if "=" in a and not a.startswith(("+", "~", "hydra.", "-"))
               and "." not in a.split("=", 1)[0] and "," not in a]
    loader = GlobalHydra.instance().config_loader()
    for overrides in (choices, []):
        try:
            cfg = loader.load_configuration(config_name, overrides, RunMode.RUN)
        except Exception:  # noqa: BLE001 - one of the choices is the problem: the defaults then
            continue
        with open_dict_safe(cfg):
            cfg.pop("hydra", None)
        return _flat_keys(cfg)
    return []


def open_dict_safe(cfg):
    from omegaconf import open_dict

    return open_dict(cfg)


def hydra_error_line(e: BaseException, args: list[str], config_name: str) -> Optional[str]:
    """The one line for a Hydra command-line error (None: not one of ours to shape)."""
    import difflib
    import re

    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if isinstance(e, OverrideParseException):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        bad = next((a for a in args if not a.startswith("-") and not _parses(parser, a)), None)
        if bad is None:
            return f"cannot read the command line: {str(e).strip().splitlines()[0]}"
        key, _, value = bad.partition("=")
        return (f"cannot read {bad!r}: Hydra takes '=', ',', spaces, quotes, brackets and non-ASCII characters in a "
                f"value for syntax; quote the value for Hydra, and the whole argument for the shell: "
                f"\"{key}='{value}'\"")
    if isinstance(e, MissingConfigException):
        text = str(e)
        m = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
        if not m:
            return None
        group, name = m.group(1).replace("/", "."), m.group(2)
        listed = re.split(r"Available options[^:\n]*:", text, maxsplit=1)[1] if "Available options" in text else ""
        options = []
        for ln in listed.splitlines()[1:]:
            if not ln.startswith(("\t", "    ")) or "=" in ln:
                break  # the search path that follows the options
            options.append(ln.strip())
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
        hint = f"did you mean {group}={close[0]}? " if close else ""
        return f"{group}={name} is not an option: {hint}(options: {', '.join(options)})"
    if isinstance(e, ConfigCompositionException):
        text = f"{e}\n{e.__cause__ or ''}"
        m = re.search(r"Could not override '([^']+)'", text) or re.search(r"full_key: (\S+)", text)
        key = m.group(1) if m else None
        if key and re.search(r"not in (struct|'\w+')", text):
            close = difflib.get_close_matches(key, _config_keys(config_name, args), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else \
                f"python -m {_entry_name()} --help lists the options"
            return f"{key} is not an option: {hint}"
        first = [ln.strip() for ln in str(e.__cause__ or e).splitlines() if ln.strip()]
        return f"{key + ': ' if key else ''}{first[0] if first else type(e).__name__}"
    return None


def _parses(parser, arg: str) -> bool:
    try:
        parser.parse_overrides([arg])
        return True
    except Exception:  # noqa: BLE001
        return False


def one_line_hydra_errors(config_name: str) -> None:
    """Shape Hydra's command-line errors into one line (:func:`hydra_error_line`), exit status 1, as every other
    user error (``HYDRA_FULL_ERROR=1`` keeps Hydra's own report)."""
    import hydra._internal.utils as hydra_utils

    original = getattr(hydra_utils.run_and_report, "__wrapped__", hydra_utils.run_and_report)

    def run_and_report(func):
        def shaped():
            try:
                return func()
            except Exception as e:  # noqa: BLE001 - every other error goes on to Hydra's own report
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                try:
                    line = hydra_error_line(e, sys.argv[1:], config_name)
                except Exception:  # noqa: BLE001 - shaping an error must never hide it
                    line = None
                if line is None:
                    raise
                sys.exit(f"{_entry_name()}: ConfigError: {line}")
        return original(shaped)

    run_and_report.__wrapped__ = original
    hydra_utils.run_and_report = run_and_report


def entry_main(config_name: str):
    """``hydra.main`` of an entry point (config ``conf/<config_name>.yaml``), with Hydra's command-line errors in
    one line (:func:`one_line_hydra_errors`)."""
    import functools

    import hydra

    from .paths import config_dir

    def decorate(task):
        hydra_main = hydra.main(config_path=config_dir(), config_name=config_name, version_base="1.3")(task)

        @functools.wraps(task)
        def main(*args, **kwargs):
            one_line_hydra_errors(config_name)
            return hydra_main(*args, **kwargs)
        return main
    return decorate


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
