"""``vicreg``: the VICReg torch.hub release (facebookresearch/vicreg ``hubconf.py``).

File ``resnet50.pth``: ``main_vicreg.py`` saves ``model.module.backbone.state_dict()`` of VICReg's own
``resnet.py`` ResNet-50, which the hub loads with ``strict=True``. Its parameter names are torchvision's
(``conv1``, ``bn1``, ``layer<s>.<b>.{conv1..3, bn1..3, downsample.0/1}``) and it has no ``fc`` (the forward ends at
the flattened average pool). Its stem pads by 1 with ``ConstantPad2d`` and then convolves with padding 2, which is
torchvision's padding 3: so the file is a plain torchvision-layout ResNet-50 state_dict without fc and the
computation is torchvision's. The embedding: the pooled 2048-d feature. (VICReg also released ResNet-50x2 and
ResNet-200x2; not supported here.)
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..checkpoint import CheckpointFormat, Mapped, plain_backbone

WHAT = "the VICReg release (resnet50.pth): a plain torchvision-layout ResNet-50 state_dict without fc"


def map_vicreg(obj: Any, model: nn.Module) -> Mapped:
    return plain_backbone(obj, WHAT)


FORMATS = (CheckpointFormat(
    "vicreg", "VICReg torch.hub release (resnet50.pth): plain torchvision-layout ResNet-50 state_dict (VICReg's "
    "resnet.py), no fc, no prefix", map_vicreg, ("resnet50",),
    "VICReg's ResNet-50 is supported (not its ResNet-50x2 / ResNet-200x2)"),)
