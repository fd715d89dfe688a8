"""What a training command checks before any data is read or any network is built (train and cache_features):
mandatory keys, values, the accelerator, the teacher's file and the data folder, all missing pieces in one error."""
from __future__ import annotations

import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ..runtime.config import ConfigError, validate_train
from ..runtime.startup import MANDATORY_HINTS, check_accelerator


def run_overrides() -> list[str] | None:
    """This run's command-line overrides (None outside a Hydra run)."""
    if not HydraConfig.initialized():
        return None
    return [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.")]


def check_train_startup(cfg: DictConfig) -> None:
    """Everything about ``cfg`` that can fail before any data is read or any network is built (also used by
    ``cache_features``): mandatory keys, values, the accelerator, the teacher's file."""
    try:
        validate_train(cfg)
        invalid = None
    except ConfigError as e:
        invalid = e
    check_missing_pieces(cfg, invalid)
    check_accelerator(cfg.trainer)


def check_missing_pieces(cfg: DictConfig, invalid: ConfigError | None = None) -> None:
    """Every piece the command still lacks, in one ``ConfigError``: the keys left at ``???``, the teacher's file
    (named or not there), the data folder (not there), each with where it comes from, and one complete example
    command (the command line's own arguments plus the missing ones); ``invalid``, the value check's error, is
    reported with them (or alone)."""
    t = cfg.teacher
    pieces: list[str] = []
    missing = set(OmegaConf.missing_keys(cfg))
    needs_file = t.format != "random" and not t.pretrain_if_missing
    fill = {}
    if "teacher.checkpoint" in missing or (needs_file and not t.checkpoint):
        missing.discard("teacher.checkpoint")
        pieces.append(f"teacher.checkpoint (the {t.name} teacher's file, teacher.format={t.format}; docs/teachers.md "
                      f"says where each teacher is downloaded)")
        fill["teacher.checkpoint"] = f"/path/to/{t.name}.pth"
    elif needs_file:
        p = Path(os.path.expanduser(str(t.checkpoint)))
        if not p.is_file():
            what = "is a folder, not a teacher checkpoint file" if p.is_dir() else "no such teacher checkpoint file"
            pieces.append(f"teacher.checkpoint={t.checkpoint}: {what} (docs/teachers.md says where each teacher is "
                          f"downloaded)")
    if "data.root" in missing or (cfg.data.name == "imagefolder" and not cfg.data.root):
        missing.discard("data.root")
        pieces.append("data.root (a folder holding train/<class>/ and val/<class>/ images)")
        fill["data.root"] = "/path/to/imagenet"
    elif cfg.data.name == "imagefolder" and cfg.data.root and not Path(os.path.expanduser(str(cfg.data.root))).is_dir():
        pieces.append(f"data.root={cfg.data.root}: no such folder (it must hold train/<class>/ and val/<class>/)")
    for key in sorted(missing):
        hint = MANDATORY_HINTS.get(key, f"{key}=<value>")
        pieces.append(f"{key} ({hint})")
        fill[key] = hint.split("=", 1)[1] if "=" in hint else "<value>"
    if invalid is not None and not (pieces and "teacher.checkpoint is required" in str(invalid)):
        if not pieces:
            raise invalid
        pieces.append(str(invalid))
    if not pieces:
        return
    if fill and not t.small_input and cfg.data.name != "imagefolder":  # an ImageNet teacher on the embedded data
        pieces.append(f"the data (data={cfg.data.name} is the embedded demo data; the {t.name} teacher is an "
                      f"ImageNet network: the paper's setting is data=imagenet data.root=<folder>)")
        fill.update({"data": "imagenet", "data.root": "/path/to/imagenet"})
    if not fill:  # files that are not there, values to fix: the plain messages
        if len(pieces) == 1:
            raise ConfigError(pieces[0].split(" (docs/")[0])
        raise ConfigError(f"{len(pieces)} problems: " + "; ".join(pieces))
    args = [a for a in (run_overrides() or []) if a.split("=", 1)[0] not in fill]
    example = " ".join(["python -m compress_lit.train", *args, *(f"{k}={v}" for k, v in fill.items())])
    raise ConfigError(f"{len(pieces)} missing: " + "; ".join(pieces) + f". A complete command: {example}")


__all__ = ["check_missing_pieces", "check_train_startup", "run_overrides"]
