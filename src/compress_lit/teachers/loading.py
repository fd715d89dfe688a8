"""Loading a teacher: build the architecture, map the file's keys with its format, check them, freeze.

Every error names the file, the format and the keys (:class:`~.checkpoint.TeacherLoadError`); when the file fits
another format, or a teacher preset of another architecture, the message says which (:mod:`.hints`).
"""
from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from ..models import backbone_options, build_from_config
from .checkpoint import LayoutMismatch, TeacherLoadError, check_mapping, read_checkpoint, sample
from .formats import CHECKPOINT_FORMATS, FORMATS
from .frozen import FrozenTeacher

log = logging.getLogger(__name__)

#: ``teacher.format=timm`` (with ``teacher.arch=timm``): a model built by timm from ``teacher.name``
TIMM = "timm"


def arch_problem(fmt: str, arch: str | None) -> str | None:
    """Why ``arch`` cannot read format ``fmt``'s releases (None when it can, or when the format takes any)."""
    spec = FORMATS.get(fmt)
    if spec is None or spec.archs is None or arch is None or arch in spec.archs:
        return None
    note = f" ({spec.arch_note})" if spec.arch_note else ""
    return f"format {fmt!r} fits teacher.arch one of {list(spec.archs)}, not {arch!r}{note}"


def _shapes(spec) -> tuple:
    """What a ViT's weight shapes depend on (not its head count: ``attn.qkv`` is (3 D, D) for any number of heads)."""
    return spec.patch_size, spec.embed_dim, spec.depth, spec.img_size, spec.layer_scale, spec.registers


def heads_problem(fmt: str, arch: str | None, num_heads: int | None) -> str | None:
    """Why a ViT file cannot load as ``arch`` in format ``fmt`` without its head count confirmed (None when it can).

    A release format fixes the architecture (DINO's ViT-S/16 has 6 heads, MoCo v3's 12: ``teacher.format=dino`` /
    ``mocov3`` refuse the other). A format that takes any architecture (``torchvision``, ``compress_lit`` ...)
    cannot tell them apart: the heads split ``attn.qkv`` without changing a single shape, so a MoCo v3 ViT-S file
    would load silently into DINO's 6-head ViT-S and compute something else. For an architecture that shares its
    weight shapes with another of another head count, ``teacher.vit.num_heads`` must say which."""
    from ..models.vit import VIT_SPECS

    spec = FORMATS.get(fmt)
    if spec is None or spec.archs is not None or num_heads is not None or arch not in VIT_SPECS:
        return None
    mine = VIT_SPECS[arch]
    others = [(n, s.num_heads) for n, s in VIT_SPECS.items()
              if _shapes(s) == _shapes(mine) and s.num_heads != mine.num_heads]
    if not others:
        return None
    alts = ", ".join(f"{n} ({h} heads)" for n, h in others)
    return (f"teacher.format={fmt} reads any file, and the weights of teacher.arch={arch} ({mine.num_heads} heads) "
            f"have exactly the shapes of {alts}: the head count changes the outputs, not the file, so it cannot be "
            f"told from the weights; confirm it with teacher.vit.num_heads=<n> (DeiT-S and DINO's ViT-S: 6, MoCo v3's "
            f"ViT-S: 12), or load a release with its own format (teacher=dino_vits16, teacher=mocov3_vits)")


def check_arch(fmt: str, model: nn.Module, where: str) -> None:
    """The architecture must be one the format's releases come in (when the format says so)."""
    why = arch_problem(fmt, getattr(model, "arch_name", None))
    if why:
        raise TeacherLoadError(f"{where}: {why}")


def _guess(fmt: str, obj: Any, model: nn.Module) -> str:
    from .hints import guess  # the other formats, then the teacher presets of every architecture

    return guess(fmt, obj, model)


def load_state_noted(path: str, fmt: str, model: nn.Module) -> tuple[int, list[str]]:
    """Load; return the number of tensors taken from the file and what the format undid in its layout (a training
    checkpoint's wrapper, a DataParallel / DDP prefix: :mod:`.wrappers`)."""
    if fmt not in FORMATS:
        raise TeacherLoadError(f"teacher checkpoint {path!r}: unknown format {fmt!r}; "
                               f"choose one of {list(CHECKPOINT_FORMATS)}")
    check_arch(fmt, model, f"teacher checkpoint {path!r}")
    obj = read_checkpoint(path, fmt)
    try:
        mapped = FORMATS[fmt].map(obj, model)
    except LayoutMismatch as e:
        raise TeacherLoadError(f"teacher checkpoint {path!r} does not fit format {fmt!r}: {e}"
                               f"{_guess(fmt, obj, model)}") from None
    notes = list(getattr(mapped, "notes", ()))
    undone = f" ({'; '.join(notes)})" if notes else ""
    state, problems = check_mapping(mapped, model)
    own = set(model.state_dict())
    if not any(m in own for _, m, _ in mapped if m is not None):
        keys = [f for f, m, _ in mapped if m is not None]
        raise TeacherLoadError(
            f"teacher checkpoint {path!r} does not fit format {fmt!r}{undone}: none of its keys maps onto the "
            f"backbone ({type(model).__name__}); file keys: {sample(keys)}{_guess(fmt, obj, model)}; "
            + "; ".join(problems))
    if problems:
        raise TeacherLoadError(f"teacher checkpoint {path!r} (format {fmt!r}{', ' + '; '.join(notes) if notes else ''})"
                               f" does not match the backbone ({type(model).__name__}): " + "; ".join(problems)
                               + _guess(fmt, obj, model))
    model.load_state_dict(state, strict=True)
    return sum(1 for _, m, _ in mapped if m is not None), notes  # every mapped tensor was loaded


def load_state(path: str, fmt: str, model: nn.Module) -> int:
    """Load and return the number of tensors taken from the file."""
    return load_state_noted(path, fmt, model)[0]


def load_backbone_state(path: str, fmt: str, model: nn.Module) -> None:
    """Read ``path``, map its keys for format ``fmt`` and load them into ``model`` (a backbone without fc).

    Raises :class:`TeacherLoadError` (naming the file, the format and the keys) for a missing or unreadable
    file, a top-level structure that does not fit the format, and any missing key, unexpected key or shape
    mismatch; only ``*.num_batches_tracked`` buffers may be absent from the file.
    """
    n, notes = load_state_noted(path, fmt, model)
    (log.info if notes else log.debug)("loaded %d tensors from %s (format %s%s)", n, path, fmt,
                                       "".join(f"; {note}" for note in notes))


def build_teacher(cfg: Any) -> FrozenTeacher:
    """Build ``cfg.arch`` (with ``cfg``'s architecture options) and load ``cfg.checkpoint`` in ``cfg.format``
    (nothing for ``random``; ``timm``: timm builds ``cfg.name`` with its pretrained weights), frozen."""
    fmt = cfg.format
    if fmt == TIMM:  # built by timm with its own weights (teachers/timm_teacher.py)
        from .timm_teacher import build_timm_backbone

        teacher = FrozenTeacher(build_timm_backbone(cfg), name=str(cfg.name))
        log.info("teacher %s: embed_dim %d, fingerprint %s", cfg.name, teacher.embed_dim, teacher.fingerprint())
        return teacher
    try:
        backbone = build_from_config(cfg)
    except ValueError as e:
        raise TeacherLoadError(f"teacher {getattr(cfg, 'name', None) or cfg.arch!r}: {e}") from None
    name = getattr(cfg, "name", None) or cfg.arch
    why = heads_problem(fmt, str(cfg.arch), backbone_options(cfg).get("num_heads"))
    if why:
        raise TeacherLoadError(f"teacher {name!r}: {why}")
    if fmt == "random":
        log.warning("teacher %s (%s): format 'random', no checkpoint loaded (randomly initialised)", name, cfg.arch)
    else:
        path = getattr(cfg, "checkpoint", None)
        if not path:
            raise TeacherLoadError(f"teacher {name!r}: format {fmt!r} needs a checkpoint path (teacher.checkpoint)")
        path = os.path.expanduser(str(path))
        n, notes = load_state_noted(path, fmt, backbone)
        log.info("teacher %s (%s): loaded %d tensors from %s (format %s%s)", name, cfg.arch, n, path, fmt,
                 "".join(f"; {note}" for note in notes))
    teacher = FrozenTeacher(backbone, name=name)
    log.info("teacher %s: embed_dim %d, fingerprint %s", name, teacher.embed_dim, teacher.fingerprint())
    return teacher


__all__ = ["TIMM", "arch_problem", "build_teacher", "check_arch", "heads_problem", "load_backbone_state", "load_state",
           "load_state_noted"]
