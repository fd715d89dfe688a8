"""``teacher=timm``: a teacher by its timm name, ``teacher.name=<model>.<pretrained tag>`` (e.g.
``vit_small_patch14_dinov2.lvd142m``, ``resnet50.a1_in1k``), built by ``timm.create_model`` with its pretrained
weights:

* no ``teacher.checkpoint``: from the Hugging Face cache (``~/.cache/huggingface``; downloaded into it when online,
  read from it with ``HF_HUB_OFFLINE=1``);
* ``teacher.checkpoint=/path/model.safetensors`` (or ``.pth`` / ``.bin``): that file, through timm's
  ``pretrained_cfg_overlay=dict(file=...)``, offline: timm reads it (a ``state_dict`` / ``model`` entry and a
  ``module.`` prefix are unwrapped by timm itself), applies the model's own converter (e.g. DINOv2's hub keys) and
  loads it strictly.

The model keeps its classifier (so that timm's load is strict: a file that does not fit the model is an error
naming the file, never a partial load) and the teacher ignores it: the embedding is :class:`~compress_lit.models.
timm_backbone.TimmBackbone`'s (``teacher.embedding`` as for our ViTs). The input is normalised with ``data.mean``
/ ``data.std`` (ImageNet's by default, which most timm weights use; the model's ``pretrained_cfg`` says).
"""
from __future__ import annotations

import logging
import os
from typing import Any

from ..models.timm_backbone import TimmBackbone, arch_of, create
from .checkpoint import TeacherLoadError, first_line

log = logging.getLogger(__name__)


def _get(cfg: Any, key: str) -> Any:
    return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)


def name_problem(name: Any) -> str | None:
    """Why ``name`` is not a timm model (None when it is)."""
    import timm

    if not name or not isinstance(name, str):
        return "teacher=timm needs teacher.name=<timm model>.<pretrained tag>, e.g. vit_small_patch14_dinov2.lvd142m"
    if not timm.is_model(name):
        close = timm.list_models(f"*{arch_of(name)[:12]}*")[:5]
        return (f"{name!r} is not a timm model name" + (f" (similar: {', '.join(close)})" if close else "")
                + "; timm.list_pretrained() lists the names with weights")
    return None


def build_timm_backbone(cfg: Any) -> TimmBackbone:
    """The timm model ``cfg.name`` with its pretrained weights (``cfg.checkpoint`` or the Hugging Face cache)."""
    name = _get(cfg, "name")
    why = name_problem(name)
    if why:
        raise TeacherLoadError(f"teacher (format 'timm'): {why}")
    path = _get(cfg, "checkpoint")
    kw: dict[str, Any] = {"pretrained": True}
    where = "the Hugging Face cache / hub"
    if path:
        path = os.path.expanduser(str(path))
        if not os.path.isfile(path):
            raise TeacherLoadError(f"teacher checkpoint {path!r} (format 'timm', teacher.name={name}): no such file")
        if not path.endswith(".safetensors"):  # a pickle: read weights-only first, for our one-line refusal
            from .checkpoint import read_checkpoint

            read_checkpoint(path, "timm")
        kw["pretrained_cfg_overlay"] = {"file": path}
        where = path
    try:
        model = create(name, **kw)
    except RuntimeError as e:  # timm's strict load_state_dict: missing / unexpected keys, shapes
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise TeacherLoadError(f"teacher {name!r} (format 'timm'): the weights from {where} do not fit timm's "
                               f"{arch_of(name)}: {detail[:600]}") from None
    except Exception as e:  # noqa: BLE001 - no cached file offline, no network, an unreadable file
        hint = ("" if path else "; offline (HF_HUB_OFFLINE=1) the weights must be in the Hugging Face cache: download "
                "them once online, or give teacher.checkpoint=<the model's .safetensors / .pth>")
        raise TeacherLoadError(f"teacher {name!r} (format 'timm'): no weights from {where}: {first_line(e)}{hint}"
                               ) from None
    try:
        backbone = TimmBackbone(model, name, embedding=_get(cfg, "embedding"))
    except ValueError as e:
        raise TeacherLoadError(f"teacher {name!r} (format 'timm'): {e}") from None
    log.info("teacher %s: timm %s with its pretrained weights from %s; embedding %s (%d-d)", name,
             type(model).__name__, where, backbone.embedding or ("cls" if backbone.token_model else "pre-logits"),
             backbone.embed_dim)
    return backbone


__all__ = ["build_timm_backbone", "name_problem"]
