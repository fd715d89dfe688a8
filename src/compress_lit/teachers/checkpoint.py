"""Reading a teacher checkpoint and checking its keys against the backbone: the machinery every format shares.

A format (:class:`CheckpointFormat`, one module per release family in ``teachers/formats/``) turns the file's
object into a list of ``(file key, backbone key or None (= dropped), tensor)``. :func:`check_mapping` then checks
that list key by key against the backbone: a missing key, an unexpected key, a shape mismatch or two file keys
landing on one backbone key is a problem, named with its keys. The one tolerated difference is a
``*.num_batches_tracked`` buffer the file does not have (older checkpoints); the model's own value is kept.
Nothing is loaded with ``strict=False``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn

SHOW = 5  # how many key names an error message lists


class Mapped(list):
    """``[(file key, backbone key or None = dropped, tensor), ...]``; ``notes``: what the format undid in the file's
    layout before mapping its keys (a training checkpoint's wrapper, a ``module.`` prefix: :mod:`.wrappers`), said
    in the log when the file loads and in the error when it does not."""

    def __init__(self, items: Iterable = (), notes: Iterable[str] = ()):
        super().__init__(items)
        self.notes = list(notes)


class TeacherLoadError(RuntimeError):
    """A teacher checkpoint that cannot be loaded; the message names the file, the format and the keys."""


class LayoutMismatch(Exception):
    """The checkpoint's top-level structure does not fit the format (becomes a TeacherLoadError)."""


@dataclass(frozen=True)
class CheckpointFormat:
    """One ``teacher.format``: its name, a one-line description of the file layout (for errors and docs), the
    key mapping ``map(file object, backbone) -> Mapped`` (raises :class:`LayoutMismatch` when the file's structure
    does not fit), and the architectures its releases come in (``None``: any)."""

    name: str
    layout: str
    map: Callable[[Any, nn.Module], Mapped]
    archs: Optional[tuple[str, ...]] = None
    arch_note: str = ""  # why the architecture must be one of ``archs`` (appended to the error)


# ------------------------------------------------------------------------------------------------------------
# reading the file
# ------------------------------------------------------------------------------------------------------------
def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def read_checkpoint(path: str, fmt: str) -> Any:
    """``torch.load(weights_only=True)`` for every format (``safety.load_torch_file``): a file whose pickle needs
    more than tensors and plain containers is refused before any of it runs, whoever made it."""
    from ..runtime.safety import CheckpointFileError, UnsafeFileError, load_torch_file

    try:
        return load_torch_file(path, "teacher.checkpoint")
    except UnsafeFileError as e:
        raise TeacherLoadError(f"teacher checkpoint {path!r} (format {fmt!r}): {str(e).split(': ', 1)[1]}") from None
    except CheckpointFileError as e:
        detail = str(e).split(": ", 1)[1]
        if detail.startswith("not a readable"):
            detail = "is " + detail
        raise TeacherLoadError(f"teacher checkpoint {path!r} (format {fmt!r}) {detail}") from None


# ------------------------------------------------------------------------------------------------------------
# helpers of the formats
# ------------------------------------------------------------------------------------------------------------
def sample(keys: Iterable[str], n: int = SHOW) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
    return f"{shown} ({len(keys)} in all)" if keys else "(none)"


def describe_top(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return f"a dict with keys {sample([str(k) for k in obj.keys()])}"
    return f"a {type(obj).__name__}"


def inner_state_dict(obj: Any, what: str) -> Mapping[str, Any]:
    """``obj['state_dict']`` of a checkpoint dict (else :class:`LayoutMismatch` saying what was expected)."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        raise LayoutMismatch(f"expected {what}; found {describe_top(obj)}")
    return obj["state_dict"]


def plain_state_dict(obj: Any, what: str) -> Mapping[str, Any]:
    """``obj`` itself when it is a non-empty ``{str: tensor}`` dict (else :class:`LayoutMismatch`)."""
    if not isinstance(obj, Mapping) or not obj:
        raise LayoutMismatch(f"expected {what}; found {describe_top(obj)}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise LayoutMismatch(f"expected {what} (every value a tensor); found {describe_top(obj)}, "
                             f"entries that are not tensors: {sample(bad)}")
    return obj


def need_prefix(sd: Mapping[str, Any], prefix: str, what: str) -> None:
    if not any(k.startswith(prefix) for k in sd):
        raise LayoutMismatch(f"expected {what}, but no key starts with {prefix!r}; the file's keys are "
                             f"{sample(list(sd))}")


def no_prefix(sd: Mapping[str, Any], prefixes: tuple[str, ...], what: str) -> None:
    """A release saved without a wrapper prefix: keys starting with ``module.`` etc. mean another layout."""
    wrapped = [k for k in sd if k.startswith(prefixes)]
    if wrapped and len(wrapped) == len(sd):
        raise LayoutMismatch(f"expected {what} with no prefix, but every key starts with "
                             f"{sorted({k.split('.', 1)[0] + '.' for k in wrapped})}: {sample(list(sd))}")


def identity(sd: Mapping[str, Any], dropped: Callable[[str], bool] = lambda k: False) -> Mapped:
    """Every key as it is (``dropped(key)``: not loaded)."""
    return [(k, None if dropped(k) else k, v) for k, v in sd.items()]


def under_prefix(sd: Mapping[str, Any], prefix: str, dropped: Callable[[str], bool],
                 ignored: Callable[[str], bool]) -> Mapped:
    """Keys ``prefix + <backbone key>`` stripped (``dropped(rest)``: the release's head, not loaded); other keys
    ``ignored(key)`` (momentum encoders, predictors, queues) are not loaded either; anything else is unexpected."""
    out: Mapped = []
    for k, v in sd.items():
        if k.startswith(prefix):
            rest = k[len(prefix):]
            out.append((k, None if dropped(rest) else rest, v))
        elif ignored(k):
            out.append((k, None, v))
        else:
            out.append((k, k, v))  # reported as unexpected
    return out


def unwrapped_identity(sd: Mapping[str, Any], dropped: Callable[[str], bool] = lambda k: False,
                       notes: Iterable[str] = ()) -> Mapped:
    """:func:`identity` on the keys without a DataParallel / DDP ``module.`` prefix (stripped once when every key
    has it: :func:`.wrappers.unprefixed`); the file keys stay the file's own in the mapping (and its errors)."""
    from .wrappers import unprefixed

    names, more = unprefixed(sd)
    return Mapped([(f, None if dropped(k) else k, sd[f]) for k, f in names.items()], [*notes, *more])


def plain_backbone(obj: Any, what: str) -> Mapped:
    """A release that is the backbone's own plain state_dict (no prefix, no head): every key as it is, so a head
    (``fc.*``) or a prefix is reported as unexpected; a ``module.`` prefix on every key (a wrapped model's
    state_dict) is stripped once."""
    from .wrappers import unprefixed

    sd = plain_state_dict(obj, what)
    no_prefix(dict.fromkeys(unprefixed(sd)[0]), ("module.", "backbone.", "encoder.", "model."), what)
    return unwrapped_identity(sd)


# ------------------------------------------------------------------------------------------------------------
# checking
# ------------------------------------------------------------------------------------------------------------
def _shape(t: Any) -> tuple:
    return tuple(getattr(t, "shape", ()))


def check_mapping(mapped: Mapped, model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state to load and the list of problems (empty when every key matches)."""
    own = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # model key -> the file key it came from
    unexpected, shapes, dupes = [], [], []
    for fkey, mkey, v in mapped:
        if mkey is None:
            continue
        if mkey not in own or not isinstance(v, torch.Tensor):
            unexpected.append(fkey if fkey == mkey else f"{fkey} (as {mkey})")
            continue
        if mkey in source:
            dupes.append(f"{source[mkey]} and {fkey} (both {mkey})")
            continue
        source[mkey] = fkey
        if v.shape != own[mkey].shape:
            shapes.append(f"{mkey}: file {_shape(v)} vs model {_shape(own[mkey])}"
                          + ("" if fkey == mkey else f" (file key {fkey})"))
        else:
            state[mkey] = v
    missing = [k for k in own if k not in source and not k.endswith("num_batches_tracked")]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch in", shapes),
                       ("duplicate", dupes)):
        if keys:
            problems.append(f"{what} {len(keys)} key{'s' * (len(keys) != 1)}: {sample(keys)}")
    for k, v in own.items():  # tolerated: num_batches_tracked absent from the file keeps the model's value
        if k not in source and k.endswith("num_batches_tracked"):
            state[k] = v
    return state, problems


__all__ = ["CheckpointFormat", "LayoutMismatch", "Mapped", "TeacherLoadError", "check_mapping", "describe_top",
           "first_line", "identity", "inner_state_dict", "need_prefix", "no_prefix", "plain_backbone",
           "plain_state_dict", "read_checkpoint", "sample", "under_prefix", "unwrapped_identity"]
