"""Key names of torchvision's ImageNet classifiers on our backbones (the paper's supervised students).

torchvision's pretrained files (``alexnet-owt-7be5be79.pth``, ``resnet18-f37072fd.pth``,
``mobilenet_v2-b0353104.pth``, ``resnet50-0676ba61.pth``) are plain state_dicts of the full classifier.
:func:`torchvision_key` says where each of their keys goes on our backbone, or ``None`` for the 1000-way head
(which the embedding never uses):

* ResNet: our layout *is* torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` …); ``fc.*`` is the head.
* MobileNetV2, MobileNetV3-Large, EfficientNet-B0: ``features.*`` is torchvision's own module (same names);
  ``classifier.*`` is the head (the backbones' ``head_prefixes``), except MobileNetV3-Large's ``classifier.0``
  (``Linear(960, 1280)``, part of its 1280-d embedding: only ``classifier.3`` is the head; ``mobilenetv3_large_pool``
  drops the whole classifier). A timm / DeiT ViT classifier's head is ``head.*``.
* AlexNet: torchvision's ``features`` holds the five convolutions at indices 0, 3, 6, 8, 10 (ReLUs and max-pools
  in between) and ``classifier`` is ``Dropout, Linear (fc6), ReLU, Dropout, Linear (fc7), ReLU, Linear (head)``,
  so ``classifier.1`` is fc6, ``classifier.4`` fc7 and ``classifier.6`` the head. They map onto the convolution
  inside our ``conv1`` … ``conv5`` blocks and the linear layer inside ``fc6`` / ``fc7``, found by type, so the
  mapping does not depend on whether those blocks hold a dropout. Our ``pool5`` (``AdaptiveMaxPool2d(6)``) equals
  torchvision's ``MaxPool2d(3, 2)`` + ``AdaptiveAvgPool2d(6)`` at 224 px (13 x 13 conv5 maps: both take the max
  over the windows starting at 0, 2, …, 10), so the embedding ReLU(fc7) is torchvision's ``classifier[:6]`` output.

A key in our own names maps to itself (a state_dict saved from our backbone), so both layouts load; anything
else maps to itself too and is then reported by the loader as unexpected.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .alexnet import AlexNet

ALEXNET_FEATURES = {0: "conv1", 3: "conv2", 6: "conv3", 8: "conv4", 10: "conv5"}
ALEXNET_CLASSIFIER = {1: "fc6", 4: "fc7"}
ALEXNET_HEAD = 6


def _inner(model: nn.Module, block: str, kind: type[nn.Module]) -> str:
    """The full name of the (only) ``kind`` module inside ``model.<block>``, e.g. ``conv1.0`` or ``fc6.1``."""
    names = [n for n, m in getattr(model, block).named_modules() if isinstance(m, kind)]
    if len(names) != 1:
        raise ValueError(f"{type(model).__name__}.{block} holds {len(names)} {kind.__name__} modules, expected 1")
    return f"{block}.{names[0]}" if names[0] else block


def alexnet_key_map(model: AlexNet) -> dict[str, str]:
    """torchvision AlexNet module prefix -> our module prefix (``features.0`` -> ``conv1.0``, ...)."""
    table = {f"features.{i}": _inner(model, b, nn.Conv2d) for i, b in ALEXNET_FEATURES.items()}
    table.update({f"classifier.{i}": _inner(model, b, nn.Linear) for i, b in ALEXNET_CLASSIFIER.items()})
    return table


def torchvision_key(key: str, model: nn.Module, table: Optional[dict[str, str]] = None) -> Optional[str]:
    """Our backbone's key for torchvision classifier key ``key`` (``None``: the classifier head, dropped).

    ``table`` is :func:`alexnet_key_map` of ``model`` (computed when not given; pass it when mapping many keys).
    """
    if key.startswith("fc."):  # the head of ResNets (and of our own backbones' optional fc)
        return None
    if isinstance(model, AlexNet):
        if key.startswith(f"classifier.{ALEXNET_HEAD}."):
            return None
        module, _, param = key.rpartition(".")
        table = alexnet_key_map(model) if table is None else table
        return f"{table[module]}.{param}" if module in table else key
    if key.startswith(tuple(getattr(model, "head_prefixes", ()))):  # MobileNet / EfficientNet classifier, ViT head
        return None
    return key


def torchvision_key_mapping(keys, model: nn.Module) -> list[tuple[str, Optional[str]]]:
    """``[(torchvision key, our key or None), ...]`` for every key of a torchvision classifier state_dict."""
    table = alexnet_key_map(model) if isinstance(model, AlexNet) else None
    return [(k, torchvision_key(k, model, table)) for k in keys]


__all__ = ["ALEXNET_CLASSIFIER", "ALEXNET_FEATURES", "ALEXNET_HEAD", "alexnet_key_map", "torchvision_key",
           "torchvision_key_mapping"]
