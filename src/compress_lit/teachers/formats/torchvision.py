"""``torchvision``: a torchvision ImageNet classifier's plain state_dict, or one saved from this package's backbone.

The paper's supervised students (``alexnet``, ``resnet18``, ``mobilenet_v2``, ``resnet50``) and the new ones
(``resnet34``, ``mobilenet_v3_large``, ``efficientnet_b0``) load with their 1000-way head dropped (``fc.*``;
MobileNet / EfficientNet ``classifier.*``; AlexNet ``classifier.6.*``, with ``features.0/3/6/8/10`` ->
``conv1..5`` and ``classifier.1/4`` -> ``fc6``/``fc7``: :mod:`compress_lit.models.torchvision_keys`). A state_dict
saved from our own backbone (ViTs included) loads by name, its optional ``fc.*`` dropped.

Files as users save them load too (:mod:`..wrappers`): the state_dict inside a training checkpoint (pytorch/examples'
ImageNet script: ``{'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer'}``) and the keys of a model saved under
``nn.DataParallel`` / ``DistributedDataParallel`` (``module.`` on every key, stripped once); the log says so.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ...models.torchvision_keys import torchvision_key_mapping
from ..checkpoint import CheckpointFormat, Mapped, plain_state_dict
from ..wrappers import training_checkpoint, unprefixed

WHAT = ("a plain state_dict of a torchvision classifier (e.g. 'conv1.weight', 'features.0.weight') or of the "
        "backbone itself (or such a state_dict under 'state_dict' of a training checkpoint)")


def map_torchvision(obj: Any, model: nn.Module) -> Mapped:
    obj, notes = training_checkpoint(obj)
    sd = plain_state_dict(obj, WHAT)
    names, more = unprefixed(sd)  # bare key -> the file's key
    return Mapped([(names[k], m, sd[names[k]]) for k, m in torchvision_key_mapping(names, model)], [*notes, *more])


FORMATS = (CheckpointFormat(
    "torchvision", "a plain state_dict (conv1.weight, layer1.0.conv1.weight, ...): a torchvision ImageNet classifier "
    "(its 1000-way head dropped) or a state_dict saved from this package's backbone; fc.* dropped; also inside a "
    "training checkpoint's 'state_dict' and with a DataParallel / DDP 'module.' prefix", map_torchvision),)
