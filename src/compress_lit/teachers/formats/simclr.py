"""SimCLR v1 ResNet-50x4 files: ``simclr_tf`` (as released with CompReSS, converted from TensorFlow) and
``simclr_converted`` (the community TF -> PyTorch converter).

``simclr_tf``: ``{'state_dict': ...}`` whose keys are TensorFlow layer names in creation order with no prefix
(``conv2d.weight``, ``batch_normalization.running_mean``, ``conv2d_1.weight`` ... ``conv2d_52.weight``,
``fc.weight``/``fc.bias``), renamed with the generated table :func:`simclr_tf_key_map`; ``fc.*`` is dropped.

``simclr_converted``: ``{'state_dict': <torchvision layout, widened>}``; ``fc.*`` is dropped.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..checkpoint import CheckpointFormat, LayoutMismatch, Mapped, inner_state_dict, sample, unwrapped_identity


def _tf_name(base: str, i: int) -> str:
    return base if i == 0 else f"{base}_{i}"


def simclr_tf_key_map(depths: Sequence[int] = (3, 4, 6, 3)) -> dict[str, str]:
    """TensorFlow layer name -> torchvision module name for a Bottleneck ResNet (SimCLR v1, any width).

    TensorFlow numbers layers in creation order: the stem ``conv2d``/``batch_normalization``, then per block
    the projection shortcut (first block of every stage only) followed by the 1x1, 3x3 and 1x1 convolutions,
    each followed by its batch norm, so ``conv2d_i`` pairs with ``batch_normalization_i``. For ResNet-50
    (``depths=(3, 4, 6, 3)``) that is 53 convolutions and 53 batch norms: ``conv2d_1`` is
    ``layer1.0.downsample.0``, ``conv2d_2..4`` are ``layer1.0.conv1..3``, ``conv2d_5..7`` ``layer1.1.conv1..3``,
    …, ``conv2d_52`` is ``layer4.2.conv3``. The classifier ``fc`` is not in the table (it is dropped).
    """
    table = {"conv2d": "conv1", "batch_normalization": "bn1"}
    i = 1
    for stage, depth in enumerate(depths):
        for block in range(depth):
            prefix = f"layer{stage + 1}.{block}"
            pairs = [(f"{prefix}.downsample.0", f"{prefix}.downsample.1")] if block == 0 else []
            pairs += [(f"{prefix}.conv{j}", f"{prefix}.bn{j}") for j in (1, 2, 3)]
            for conv, bn in pairs:
                table[_tf_name("conv2d", i)] = conv
                table[_tf_name("batch_normalization", i)] = bn
                i += 1
    return table


def _resnet_depths(model: nn.Module) -> tuple[int, ...]:
    n = getattr(model, "num_stages", None)
    if not isinstance(n, int) or not all(hasattr(model, f"layer{i + 1}") for i in range(n)):
        return (3, 4, 6, 3)
    return tuple(len(getattr(model, f"layer{i + 1}")) for i in range(n))


def map_simclr_tf(obj: Any, model: nn.Module) -> Mapped:
    what = ("a TensorFlow-converted SimCLR checkpoint: {'state_dict': ...} with keys 'conv2d.weight', "
            "'batch_normalization.running_mean', 'conv2d_1.weight', ...")
    sd = inner_state_dict(obj, what)
    if not any(k.split(".", 1)[0] == "conv2d" for k in sd):
        raise LayoutMismatch(f"expected {what}, but there is no 'conv2d.*' key; the file's keys are "
                             f"{sample(list(sd))}")
    table = simclr_tf_key_map(_resnet_depths(model))
    out: Mapped = []
    for k, v in sd.items():
        layer, _, param = k.partition(".")
        if layer == "fc":
            out.append((k, None, v))  # the supervised 8192 -> 1000 head
        elif layer in table and param:
            out.append((k, f"{table[layer]}.{param}", v))
        else:
            out.append((k, k, v))
    return out


def map_simclr_converted(obj: Any, model: nn.Module) -> Mapped:
    what = "a converted SimCLR checkpoint: {'state_dict': <torchvision-layout keys>}"
    return unwrapped_identity(inner_state_dict(obj, what), dropped=lambda k: k.startswith("fc."))


FORMATS = (
    CheckpointFormat("simclr_tf", "SimCLR v1 R50x4 as released with CompReSS: {'state_dict': {'conv2d.weight', "
                     "'batch_normalization.*', 'conv2d_1.weight', ..., 'fc.*'}} (TensorFlow names in creation order)",
                     map_simclr_tf),
    CheckpointFormat("simclr_converted", "community PyTorch converter: {'state_dict': <torchvision layout, widened>}; "
                     "fc.* dropped", map_simclr_converted),
)
