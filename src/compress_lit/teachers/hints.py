"""What a teacher file is, when it does not load as the format and architecture asked for.

A loading error ends with a hint (:func:`guess`), from two searches:

1. the other formats with the *same* architecture ("the file fits format 'swav' instead");
2. every teacher preset of ``conf/teacher/`` (its format and its architecture at the preset's real sizes, built on
   the meta device: no memory, no weights), so that a file given with the wrong architecture is named with the
   preset that reads it: "this is a DINO ViT-S/16 file: teacher=dino_vits16". The description is the preset file's
   first comment line, up to its first parenthesis or colon.

Only when neither finds anything does the message say that nothing fits. The searches run on the error path only
(building the ~20 preset architectures on the meta device takes about a second).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .checkpoint import LayoutMismatch, check_mapping
from .formats import CHECKPOINT_FORMATS, FORMATS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    name: str  # teacher=<name>
    arch: str
    format: str
    description: str
    small_input: bool = False
    width_multiplier: Optional[float] = None
    vit: tuple = ()  # (key, value) pairs of the preset's vit.* sizes


def _description(text: str, name: str) -> str:
    first = next((line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")), "")
    cut = [i for i in (first.find(" ("), first.find(":")) if i > 0]
    return (first[:min(cut)] if cut else first) or name


@functools.lru_cache(maxsize=1)
def teacher_presets() -> tuple[Preset, ...]:
    """The ``conf/teacher/*.yaml`` presets of a checkpoint format and a built-in architecture."""
    from omegaconf import OmegaConf

    from ..models import ARCHITECTURES
    from ..runtime.paths import ConfigDirNotFound, config_dir

    try:
        folder = Path(config_dir()) / "teacher"
    except ConfigDirNotFound:
        return ()
    presets = []
    for path in sorted(folder.glob("*.yaml")):
        node = OmegaConf.load(path)
        arch, fmt = node.get("arch"), node.get("format", "torchvision")
        if arch not in ARCHITECTURES or fmt not in FORMATS:  # e.g. teacher=timm: built by timm, not by a format
            continue
        vit = node.get("vit") or {}
        presets.append(Preset(name=path.stem, arch=str(arch), format=str(fmt),
                              description=_description(path.read_text(), path.stem),
                              small_input=bool(node.get("small_input", False)),
                              width_multiplier=node.get("width_multiplier"),
                              vit=tuple(sorted((k, int(v)) for k, v in vit.items() if v is not None))))
    return tuple(presets)


@functools.lru_cache(maxsize=None)
def _meta_model(arch: str, small_input: bool, width_multiplier: Optional[float], vit: tuple) -> Optional[nn.Module]:
    from ..models import build_backbone

    try:
        with torch.device("meta"):
            return build_backbone(arch, small_input=small_input, width_multiplier=width_multiplier, **dict(vit))
    except Exception as e:  # noqa: BLE001 - a preset that cannot be built only leaves the hint out
        log.debug("hint: teacher preset architecture %s not built on the meta device: %s", arch, e)
        return None


def fits(fmt: str, obj: Any, model: nn.Module) -> bool:
    """Whether the file's object loads as format ``fmt`` into ``model`` (every key and shape)."""
    from .loading import arch_problem

    if arch_problem(fmt, getattr(model, "arch_name", None)):
        return False
    try:
        _, problems = check_mapping(FORMATS[fmt].map(obj, model), model)
    except LayoutMismatch:
        return False
    return not problems


def fitting_presets(obj: Any, exclude: tuple[str, str] | None = None) -> list[Preset]:
    """The teacher presets whose format and architecture read the file (``exclude``: a (format, arch) pair that
    was already tried)."""
    found = []
    for p in teacher_presets():
        if (p.format, p.arch) == exclude:
            continue
        model = _meta_model(p.arch, p.small_input, p.width_multiplier, p.vit)
        if model is not None and fits(p.format, obj, model):
            found.append(p)
    return found


def guess(fmt: str, obj: Any, model: nn.Module) -> str:
    """The end of a loading error: the formats the file fits with this architecture, the presets it fits with any,
    or that nothing fits."""
    arch = getattr(model, "arch_name", None)
    same = [f for f in CHECKPOINT_FORMATS if f != fmt and fits(f, obj, model)]
    presets = fitting_presets(obj, exclude=(fmt, arch))
    parts = []
    if same:
        parts.append(f"the file fits format {' / '.join(repr(f) for f in same)} instead")
    if presets:
        named = " or ".join(f"teacher={p.name} (format {p.format!r}, teacher.arch={p.arch})" for p in presets)
        descriptions = sorted({p.description for p in presets})
        what = descriptions[0] if len(descriptions) == 1 else " / ".join(descriptions)
        parts.append(f"this is a {what} file: {named}")
    if not parts:
        return (f"; no other format fits it with teacher.arch={arch}, and no teacher preset "
                f"(conf/teacher/) fits it either")
    return "; " + "; ".join(parts)


__all__ = ["Preset", "fits", "fitting_presets", "guess", "teacher_presets"]
