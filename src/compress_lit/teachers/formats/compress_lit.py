"""``compress_lit``: this project's own Lightning checkpoints.

File: ``{'state_dict': ...}`` with the backbone under ``backbone.`` (MoCo pretraining) or, if there is none, the
student under ``student.`` (distillation). Other top-level prefixes are ignored; under the chosen prefix every
key must match.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..checkpoint import CheckpointFormat, Mapped, inner_state_dict, need_prefix

WHAT = ("a compress_lit Lightning checkpoint: a dict with 'state_dict' holding 'backbone.*' (pretraining) "
        "or 'student.*' (distillation) keys")


def map_compress_lit(obj: Any, model: nn.Module) -> Mapped:
    sd = inner_state_dict(obj, WHAT)
    prefix = "backbone." if any(k.startswith("backbone.") for k in sd) else "student."
    need_prefix(sd, prefix, WHAT)
    return [(k, k[len(prefix):] if k.startswith(prefix) else None, v) for k, v in sd.items()]


FORMATS = (CheckpointFormat(
    "compress_lit", "this project's checkpoints (pretraining: backbone.*; distillation: student.*)",
    map_compress_lit),)
