"""``swav``: the SwAV torch.hub release (``swav_800ep_pretrain.pth.tar``).

File: a plain state_dict with keys ``module.<torchvision ResNet key>``; ``module.projection_head.*`` and
``module.prototypes.*`` are dropped.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..checkpoint import CheckpointFormat, Mapped, need_prefix, plain_state_dict, under_prefix

WHAT = "a SwAV release checkpoint: a plain state_dict with keys 'module.<backbone key>'"


def map_swav(obj: Any, model: nn.Module) -> Mapped:
    sd = plain_state_dict(obj, WHAT)
    need_prefix(sd, "module.", WHAT)
    return under_prefix(sd, "module.", dropped=lambda rest: rest.startswith(("projection_head.", "prototypes.")),
                        ignored=lambda k: False)


FORMATS = (CheckpointFormat(
    "swav", "SwAV torch.hub release: {'module.<torchvision key>': ...}; projection_head.*, prototypes.* dropped",
    map_swav),)
