"""The teacher checkpoint formats: one module per release family, each a key table and its checks.

Every module of this package defines ``FORMATS``, a tuple of :class:`~compress_lit.teachers.checkpoint.
CheckpointFormat`; they are collected here by walking the package, so adding a format is one new file (its name
then appears in ``teacher.format``'s choices, ``compress_lit.runtime.config.TEACHER_FORMATS``).
"""
from __future__ import annotations

import importlib
import pkgutil

from ..checkpoint import CheckpointFormat


def _collect() -> dict[str, CheckpointFormat]:
    found: dict[str, CheckpointFormat] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for fmt in getattr(module, "FORMATS", ()):
            if fmt.name in found or fmt.name == "random":
                raise RuntimeError(f"teacher format {fmt.name!r} is defined twice (or shadows 'random'): "
                                   f"{module.__name__}")
            found[fmt.name] = fmt
    return found


FORMATS: dict[str, CheckpointFormat] = _collect()
CHECKPOINT_FORMATS: tuple[str, ...] = tuple(FORMATS)

__all__ = ["CHECKPOINT_FORMATS", "FORMATS"]
