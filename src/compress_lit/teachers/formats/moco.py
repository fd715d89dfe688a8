"""``moco``: the MoCo v1 / v2 releases (``moco_v2_800ep_pretrain.pth.tar`` ...).

File: ``{'epoch', 'arch', 'state_dict', 'optimizer'}``; the query encoder's keys are
``module.encoder_q.<torchvision ResNet key>``. Dropped: the head (``fc.weight``/``fc.bias`` in v1, the MLP
``fc.0.*``/``fc.2.*`` in v2), the key encoder ``module.encoder_k.*`` and the queue ``module.queue``,
``module.queue_ptr``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..checkpoint import CheckpointFormat, Mapped, inner_state_dict, need_prefix, under_prefix

PREFIX = "module.encoder_q."
WHAT = "a MoCo release checkpoint: a dict with 'state_dict' whose keys are 'module.encoder_q.<backbone key>'"


def map_moco(obj: Any, model: nn.Module) -> Mapped:
    sd = inner_state_dict(obj, WHAT)
    need_prefix(sd, PREFIX, WHAT)
    return under_prefix(sd, PREFIX, dropped=lambda rest: rest.startswith("fc."),
                        ignored=lambda k: k.startswith("module.encoder_k.") or k in ("module.queue",
                                                                                      "module.queue_ptr"))


FORMATS = (CheckpointFormat(
    "moco", "MoCo v1/v2 release: {'state_dict': {'module.encoder_q.<torchvision key>': ...}}; the head (fc.* / fc.0, "
    "fc.2), encoder_k and the queue dropped", map_moco),)
