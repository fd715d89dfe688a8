"""Teacher files as users have them: the backbone's state_dict inside a training checkpoint, or saved from a model
wrapped in ``nn.DataParallel`` / ``DistributedDataParallel`` (every key prefixed ``module.``).

* :func:`training_checkpoint`: pytorch/examples' ImageNet script (``imagenet/main.py``) saves ``{'epoch', 'arch',
  'state_dict', 'best_acc1', 'optimizer'}`` (other scripts add 'scheduler', 'scaler' ...); the ``state_dict`` entry
  is taken when the file is such a dict (a plain state_dict never holds a dict under ``state_dict``).
* :func:`unprefixed`: a ``module.`` prefix that *every* key carries is stripped once (a file saved from
  ``model.state_dict()`` of a wrapped model: pytorch/examples' script wraps every model so). Only formats whose
  release layout has no prefix of its own use it (``torchvision``, ``dino``, ``dinov2``, ``barlowtwins``,
  ``vicreg``, ``simclr_converted``): there the prefix cannot mean anything else. MoCo's ``module.encoder_q.``,
  MoCo v3's ``module.base_encoder.`` and SwAV's ``module.`` are their formats' own layouts and stay theirs.

Each returns notes (what was undone), which the loader states in its log line; the error messages keep the file's
own keys.
"""
from __future__ import annotations

from typing import Any, Mapping

PREFIX = "module."


def training_checkpoint(obj: Any) -> tuple[Any, list[str]]:
    """``obj['state_dict']`` when ``obj`` is a training checkpoint holding it, else ``obj``; and the notes."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        others = [str(k) for k in obj if k != "state_dict"]
        what = f"a training checkpoint (keys {', '.join(['state_dict', *others][:6])})" if others else \
            "a dict holding only 'state_dict'"
        return obj["state_dict"], [f"its 'state_dict' entry taken from {what}"]
    return obj, []


def unprefixed(sd: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """``{key without the wrapper prefix: file key}`` (the prefix stripped once when every key has it; else every
    key as it is) and the notes."""
    keys = [str(k) for k in sd]
    if keys and all(k.startswith(PREFIX) for k in keys):
        return {k[len(PREFIX):]: k for k in keys}, [
            f"the {PREFIX!r} prefix of every key (a model saved under nn.DataParallel / DistributedDataParallel) "
            f"stripped once"]
    return {k: k for k in keys}, []


__all__ = ["PREFIX", "training_checkpoint", "unprefixed"]
