"""``barlowtwins``: the Barlow Twins torch.hub release (facebookresearch/barlowtwins ``hubconf.py``).

File ``resnet50.pth`` (``ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/``): ``main.py`` saves
``model.module.backbone.state_dict()``, the backbone being ``torchvision.models.resnet50(zero_init_residual=True)``
with ``fc = nn.Identity()``; so a plain torchvision-layout ResNet-50 state_dict (``conv1.weight``, ``bn1.*``,
``layer1.0.conv1.weight`` ... ``layer4.2.bn3.*``, BatchNorm ``num_batches_tracked`` included) with no ``fc`` and no
prefix (the hub loads it with ``strict=False`` because the classifier it builds has an fc). The projector is not
in the file. The embedding: the pooled 2048-d feature.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..checkpoint import CheckpointFormat, Mapped, plain_backbone

WHAT = "the Barlow Twins release (resnet50.pth): a plain torchvision-layout ResNet-50 state_dict without fc"


def map_barlowtwins(obj: Any, model: nn.Module) -> Mapped:
    return plain_backbone(obj, WHAT)


FORMATS = (CheckpointFormat(
    "barlowtwins", "Barlow Twins torch.hub release (resnet50.pth): plain torchvision ResNet-50 state_dict, no fc, "
    "no prefix", map_barlowtwins, ("resnet50",), "Barlow Twins released a ResNet-50"),)
