"""Backbones. Each returns its embedding from ``forward`` and named layers from ``forward_features``.

``build_backbone(arch, **kw)`` is the one way the rest of the package makes a network (``build_from_config`` reads
the keyword arguments from a ``teacher`` / ``student`` / ``model`` config node); ``embed_dim`` says how wide the
embedding is, ``layer_names`` which layers ``forward_features`` can return, ``arch_name`` which entry of
:data:`ARCHITECTURES` built it.

Embeddings: AlexNet ReLU(fc7); the plain ConvNet (the Fashion-MNIST teacher), ResNets, MobileNetV2 and
EfficientNet the global average pool of the last convolutional stage; MobileNetV3-Large that pool through its
960 -> 1280 layer and Hardswish (1280-d; ``mobilenetv3_large_pool``: the 960-d pool); ViTs the class token after the
final norm (or ``embedding=mean_patch|cls_and_mean``).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from .alexnet import AlexNet
from .convnet import ConvNet
from .efficientnet import EfficientNetB0
from .mobilenet import MobileNetV2
from .mobilenetv3 import MobileNetV3Large, mobilenetv3_large_pool
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet50x4
from .vit import EMBEDDINGS, OVERRIDABLE as VIT_OPTIONS, VIT_SPECS, ViT, vit_constructor

ARCHITECTURES = {
    "alexnet": AlexNet,
    "convnet": ConvNet,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet50x4": resnet50x4,
    "mobilenetv2": MobileNetV2,
    "mobilenetv3_large": MobileNetV3Large,  # 1280-d: pool, Linear(960, 1280), Hardswish (SEED, DisCo, timm)
    "mobilenetv3_large_pool": mobilenetv3_large_pool,  # the 960-d average pool alone
    "efficientnet_b0": EfficientNetB0,
    **{name: vit_constructor(name) for name in VIT_SPECS},
}


#: the architectures with a stochastic depth rate (``student.drop_path``)
DROP_PATH_ARCHS = ("efficientnet_b0",)


def is_vit(arch: str) -> bool:
    return arch in VIT_SPECS


def build_backbone(arch: str, small_input: bool = False, width_multiplier: float | None = None,
                   **kw) -> nn.Module:
    """Make a backbone by name. ``width_multiplier=None`` keeps the architecture's own width; ViTs take
    ``embedding`` and the size overrides ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``img_size``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if width_multiplier is not None:
        kw["width_multiplier"] = width_multiplier
    if kw.get("drop_path") is not None and arch not in DROP_PATH_ARCHS:
        raise ValueError(f"{arch}: drop_path (stochastic depth) applies to {list(DROP_PATH_ARCHS)} only")
    kw = {k: v for k, v in kw.items() if k != "drop_path" or v is not None}
    if not is_vit(arch):
        vit_only = sorted(k for k in ("embedding", *VIT_OPTIONS) if kw.get(k) is not None)
        if vit_only:
            raise ValueError(f"{arch} is not a ViT: {vit_only} apply to ViT architectures only")
        kw = {k: v for k, v in kw.items() if k not in ("embedding", *VIT_OPTIONS)}
    model = ARCHITECTURES[arch](small_input=small_input, **kw)
    model.arch_name = arch
    return model


def _get(node: Any, key: str, default: Any = None) -> Any:
    if node is None:
        return default
    if isinstance(node, Mapping) or hasattr(node, "get"):
        v = node.get(key, default)
    else:
        v = getattr(node, key, default)
    return default if v is None else v


def backbone_options(node: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`build_backbone` that a ``teacher`` / ``student`` / ``model`` config node sets
    (``small_input``, ``width_multiplier``; AlexNet ``fc_dim``, ``dropout``; EfficientNet ``drop_path``; ViT
    ``embedding`` and ``vit.*``)."""
    kw: dict[str, Any] = {"small_input": bool(_get(node, "small_input", False)),
                          "width_multiplier": _get(node, "width_multiplier")}
    if _get(node, "fc_dim") is not None:
        kw["fc_dim"] = int(_get(node, "fc_dim"))
    if _get(node, "dropout"):
        kw["dropout"] = float(_get(node, "dropout"))
    if _get(node, "drop_path") is not None:
        kw["drop_path"] = float(_get(node, "drop_path"))
    if _get(node, "embedding") is not None:
        kw["embedding"] = str(_get(node, "embedding"))
    vit_node = _get(node, "vit")
    for k in VIT_OPTIONS:
        if _get(vit_node, k) is not None:
            kw[k] = int(_get(vit_node, k))
    return kw


def build_from_config(node: Any, **kw) -> nn.Module:
    """``build_backbone(node.arch, **backbone_options(node), **kw)``."""
    return build_backbone(str(_get(node, "arch")), **{**backbone_options(node), **kw})


def option_problems(node: Any) -> list[tuple[str, str]]:
    """``(key, message)`` for every option of a config node that its architecture cannot take (keys relative
    to the node: ``embedding``, ``vit.embed_dim``, ``width_multiplier`` ...)."""
    arch = str(_get(node, "arch"))
    problems = []
    drop_path = _get(node, "drop_path")
    if drop_path is not None and arch not in DROP_PATH_ARCHS:
        problems.append(("drop_path", f"stochastic depth applies to {list(DROP_PATH_ARCHS)} only, not {arch!r}"))
    elif drop_path is not None and not 0 <= float(drop_path) < 1:
        problems.append(("drop_path", "need 0 <= rate < 1"))
    embedding = _get(node, "embedding")
    vit_node = _get(node, "vit")
    set_vit = [k for k in VIT_OPTIONS if _get(vit_node, k) is not None]
    if not is_vit(arch):
        if embedding is not None:
            problems.append(("embedding", f"applies to ViT architectures only, not {arch!r} (whose embedding is "
                                          f"its {embedding_layer(arch)} feature)"))
        problems += [(f"vit.{k}", f"applies to ViT architectures only, not {arch!r}") for k in set_vit]
        return problems
    if embedding is not None and embedding not in EMBEDDINGS:
        problems.append(("embedding", f"choose one of {list(EMBEDDINGS)}"))
    if _get(node, "width_multiplier") is not None:
        problems.append(("width_multiplier", f"does not apply to the ViT {arch!r}: set vit.embed_dim and "
                                             f"vit.num_heads instead"))
    problems += [(f"vit.{k}", "must be > 0") for k in set_vit if int(_get(vit_node, k)) <= 0]
    if not problems:
        from .vit import resolve_spec

        try:
            resolve_spec(VIT_SPECS[arch], bool(_get(node, "small_input", False)),
                         **{k: _get(vit_node, k) for k in set_vit})
        except ValueError as e:
            problems.append(("vit", str(e)))
    return problems


def embedding_layer(arch: str) -> str:
    """The layer whose output is the architecture's embedding (docs/paper.md: AlexNet fc7, others the pool)."""
    return "fc7" if arch == "alexnet" else "pool"


__all__ = ["AlexNet", "ARCHITECTURES", "EfficientNetB0", "MobileNetV2", "MobileNetV3Large", "ResNet", "ViT",
           "backbone_options", "build_backbone", "build_from_config", "embedding_layer", "is_vit",
           "option_problems"]
