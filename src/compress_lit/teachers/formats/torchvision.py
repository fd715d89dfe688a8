"""``torchvision``: a torchvision ImageNet classifier's plain state_dict, or one saved from this package's backbone.

The paper's supervised students (``alexnet``, ``resnet18``, ``mobilenet_v2``, ``resnet50``) and the new ones
(``resnet34``, ``mobilenet_v3_large``, ``efficientnet_b0``) load with their 1000-way head dropped (``fc.*``;
MobileNet / EfficientNet ``classifier.*``; AlexNet ``classifier.6.*``, with ``features.0/3/6/8/10`` ->
``conv1..5`` and ``classifier.1/4`` -> ``fc6``/``fc7``: :mod:`compress_lit.models.torchvision_keys`). A state_dict
saved from our own backbone (ViTs included) loads by name, its optional ``fc.*`` dropped.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ...models.torchvision_keys import torchvision_key_mapping
from ..checkpoint import CheckpointFormat, Mapped, plain_state_dict

WHAT = ("a plain state_dict of a torchvision classifier (e.g. 'conv1.weight', 'features.0.weight') or of the "
        "backbone itself")


def map_torchvision(obj: Any, model: nn.Module) -> Mapped:
    sd = plain_state_dict(obj, WHAT)
    return [(k, m, sd[k]) for k, m in torchvision_key_mapping(sd, model)]


FORMATS = (CheckpointFormat(
    "torchvision", "a plain state_dict (conv1.weight, layer1.0.conv1.weight, ...): a torchvision ImageNet classifier "
    "(its 1000-way head dropped) or a state_dict saved from this package's backbone; fc.* dropped", map_torchvision),)
