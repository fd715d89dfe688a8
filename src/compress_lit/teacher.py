"""Loading frozen teachers: the one place that reads teacher checkpoints.

Every public teacher release has its own key layout (docs/paper.md, "Public teacher checkpoints").
Each format below maps the file's keys onto the backbone's own parameter names *explicitly*, and the result is
checked key by key against the backbone: a missing key, an unexpected key or a shape mismatch is an error that
names the file, the format and the keys. The one tolerated difference is a ``*.num_batches_tracked`` buffer the
file does not have (older checkpoints); the model's own value is kept. Nothing is loaded with ``strict=False``.

Formats (``TeacherConfig.format``):

``moco``
    MoCo v1/v2 release: ``{'epoch', 'arch', 'state_dict', 'optimizer'}``, backbone keys
    ``module.encoder_q.<torchvision key>``. The head (``fc.weight/bias`` in v1, the MLP ``fc.0.*``/``fc.2.*`` in
    v2) is dropped; ``module.encoder_k.*``, ``module.queue``, ``module.queue_ptr`` are ignored.
``swav``
    SwAV release: a plain state_dict, keys ``module.<torchvision key>``; ``module.projection_head.*`` and
    ``module.prototypes.*`` are dropped.
``simclr_tf``
    SimCLR v1 ResNet-50x4 as released with CompReSS (converted from TensorFlow): ``{'state_dict': ...}`` whose
    keys are TensorFlow layer names in creation order with no prefix (``conv2d.weight``,
    ``batch_normalization.running_mean``, ``conv2d_1.weight`` … ``conv2d_52.weight``, ``fc.weight``/``fc.bias``).
    The keys are renamed with the generated table :func:`simclr_tf_key_map`; ``fc.*`` is dropped.
``simclr_converted``
    The community TF->PyTorch SimCLR converter: ``{'state_dict': <torchvision layout>}``; ``fc.*`` is dropped.
``torchvision``
    A torchvision ImageNet classifier's plain state_dict (the paper's supervised students: ``alexnet``,
    ``resnet18``, ``mobilenet_v2``, ``resnet50``), its 1000-way head dropped (``fc.*``; MobileNetV2
    ``classifier.*``; AlexNet ``classifier.6.*``, with ``features.0/3/6/8/10`` -> ``conv1..5`` and
    ``classifier.1/4`` -> ``fc6``/``fc7``; :mod:`compress_lit.models.torchvision_keys`), or a state_dict saved
    from the backbone itself (this package's names; ``fc.*`` dropped).
``compress_lit``
    This project's own Lightning checkpoints: ``{'state_dict': ...}`` with the backbone under ``backbone.``
    (MoCo pretraining) or, if there is none, the student under ``student.`` (distillation). Other top-level
    prefixes are ignored; under the chosen prefix every key must match.
``random``
    No checkpoint: the randomly initialised backbone (sanity runs only).
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .models import build_backbone
from .models.torchvision_keys import torchvision_key_mapping

log = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("moco", "swav", "simclr_tf", "simclr_converted", "torchvision", "compress_lit")
_SHOW = 5  # how many key names an error message lists


class TeacherLoadError(RuntimeError):
    """A teacher checkpoint that cannot be loaded; the message names the file, the format and the keys."""


class _LayoutMismatch(Exception):
    """The checkpoint's top-level structure does not fit the format (internal; becomes a TeacherLoadError)."""


# ------------------------------------------------------------------------------------------------------------
# key tables
# ------------------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------------------
# reading the file
# ------------------------------------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def _read_checkpoint(path: str, fmt: str) -> Any:
    if not os.path.exists(path):
        raise TeacherLoadError(f"teacher checkpoint {path!r} (format {fmt!r}): no such file")
    if os.path.isdir(path):
        raise TeacherLoadError(f"teacher checkpoint {path!r} (format {fmt!r}): is a directory, not a checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not readable"; the cause goes into the message
        first = e
    if fmt == "compress_lit":
        # Lightning checkpoints of this project may carry hyper-parameters (DictConfig, ...) that the
        # weights-only unpickler refuses; they are our own files, so a full unpickle is acceptable here only.
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise TeacherLoadError(
                f"teacher checkpoint {path!r} (format {fmt!r}) is not a readable checkpoint "
                f"(truncated, corrupt or not a torch file): {_first_line(e)}") from e
    raise TeacherLoadError(
        f"teacher checkpoint {path!r} (format {fmt!r}) is not a readable checkpoint (truncated, corrupt, not a "
        f"torch file, or holding objects torch.load(weights_only=True) refuses): {_first_line(first)}") from first


# ------------------------------------------------------------------------------------------------------------
# per-format key mapping: file object -> list of (file_key, model_key or None (= dropped), tensor)
# ------------------------------------------------------------------------------------------------------------
Mapped = list  # list[tuple[str, str | None, Any]]


def _sample(keys: Iterable[str], n: int = _SHOW) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
    return f"{shown} ({len(keys)} in all)" if keys else "(none)"


def _describe_top(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return f"a dict with keys {_sample([str(k) for k in obj.keys()])}"
    return f"a {type(obj).__name__}"


def _inner_state_dict(obj: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        raise _LayoutMismatch(f"expected {what}; found {_describe_top(obj)}")
    return obj["state_dict"]


def _plain_state_dict(obj: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping) or not obj:
        raise _LayoutMismatch(f"expected {what}; found {_describe_top(obj)}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise _LayoutMismatch(f"expected {what} (every value a tensor); found {_describe_top(obj)}, "
                              f"entries that are not tensors: {_sample(bad)}")
    return obj


def _need_prefix(sd: Mapping[str, Any], prefix: str, what: str) -> None:
    if not any(k.startswith(prefix) for k in sd):
        raise _LayoutMismatch(f"expected {what}, but no key starts with {prefix!r}; the file's keys are "
                              f"{_sample(list(sd))}")


def _map_moco(obj: Any, model: nn.Module) -> Mapped:
    what = "a MoCo release checkpoint: a dict with 'state_dict' whose keys are 'module.encoder_q.<backbone key>'"
    sd = _inner_state_dict(obj, what)
    _need_prefix(sd, "module.encoder_q.", what)
    out: Mapped = []
    for k, v in sd.items():
        if k.startswith("module.encoder_q."):
            rest = k[len("module.encoder_q."):]
            out.append((k, None if rest.startswith("fc.") else rest, v))  # v1 fc / v2 MLP fc.0, fc.2: head
        elif k.startswith("module.encoder_k.") or k in ("module.queue", "module.queue_ptr"):
            out.append((k, None, v))  # key encoder and queue
        else:
            out.append((k, k, v))  # unknown: reported as unexpected
    return out


def _map_swav(obj: Any, model: nn.Module) -> Mapped:
    what = "a SwAV release checkpoint: a plain state_dict with keys 'module.<backbone key>'"
    sd = _plain_state_dict(obj, what)
    _need_prefix(sd, "module.", what)
    out: Mapped = []
    for k, v in sd.items():
        if k.startswith(("module.projection_head.", "module.prototypes.")):
            out.append((k, None, v))
        elif k.startswith("module."):
            out.append((k, k[len("module."):], v))
        else:
            out.append((k, k, v))
    return out


def _resnet_depths(model: nn.Module) -> tuple[int, ...]:
    n = getattr(model, "num_stages", None)
    if not isinstance(n, int) or not all(hasattr(model, f"layer{i + 1}") for i in range(n)):
        return (3, 4, 6, 3)
    return tuple(len(getattr(model, f"layer{i + 1}")) for i in range(n))


def _map_simclr_tf(obj: Any, model: nn.Module) -> Mapped:
    what = ("a TensorFlow-converted SimCLR checkpoint: {'state_dict': ...} with keys 'conv2d.weight', "
            "'batch_normalization.running_mean', 'conv2d_1.weight', ...")
    sd = _inner_state_dict(obj, what)
    if not any(k.split(".", 1)[0] == "conv2d" for k in sd):
        raise _LayoutMismatch(f"expected {what}, but there is no 'conv2d.*' key; the file's keys are "
                              f"{_sample(list(sd))}")
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


def _drop_fc(sd: Mapping[str, Any]) -> Mapped:
    return [(k, None if k.startswith("fc.") else k, v) for k, v in sd.items()]


def _map_simclr_converted(obj: Any, model: nn.Module) -> Mapped:
    what = "a converted SimCLR checkpoint: {'state_dict': <torchvision-layout keys>}"
    return _drop_fc(_inner_state_dict(obj, what))


def _map_torchvision(obj: Any, model: nn.Module) -> Mapped:
    what = ("a plain state_dict of a torchvision classifier (e.g. 'conv1.weight', 'features.0.weight') or of the "
            "backbone itself")
    sd = _plain_state_dict(obj, what)
    return [(k, m, sd[k]) for k, m in torchvision_key_mapping(sd, model)]


def _map_compress_lit(obj: Any, model: nn.Module) -> Mapped:
    what = ("a compress_lit Lightning checkpoint: a dict with 'state_dict' holding 'backbone.*' (pretraining) "
            "or 'student.*' (distillation) keys")
    sd = _inner_state_dict(obj, what)
    prefix = "backbone." if any(k.startswith("backbone.") for k in sd) else "student."
    _need_prefix(sd, prefix, what)
    return [(k, k[len(prefix):] if k.startswith(prefix) else None, v) for k, v in sd.items()]


_MAPPERS: dict[str, Callable[[Any, nn.Module], Mapped]] = {
    "moco": _map_moco,
    "swav": _map_swav,
    "simclr_tf": _map_simclr_tf,
    "simclr_converted": _map_simclr_converted,
    "torchvision": _map_torchvision,
    "compress_lit": _map_compress_lit,
}


# ------------------------------------------------------------------------------------------------------------
# checking and loading
# ------------------------------------------------------------------------------------------------------------
def _shape(t: Any) -> tuple:
    return tuple(getattr(t, "shape", ()))


def _check(mapped: Mapped, model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
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
            problems.append(f"{what} {len(keys)} key{'s' * (len(keys) != 1)}: {_sample(keys)}")
    for k, v in own.items():  # tolerated: num_batches_tracked absent from the file keeps the model's value
        if k not in source and k.endswith("num_batches_tracked"):
            state[k] = v
    return state, problems


def _fits(fmt: str, obj: Any, model: nn.Module) -> bool:
    try:
        _, problems = _check(_MAPPERS[fmt](obj, model), model)
    except _LayoutMismatch:
        return False
    return not problems


def _guess(fmt: str, obj: Any, model: nn.Module) -> str:
    fits = [f for f in CHECKPOINT_FORMATS if f != fmt and _fits(f, obj, model)]
    if fits:
        return f"; the file fits format {' / '.join(repr(f) for f in fits)} instead"
    return "; no other format fits it either"


def _load(path: str, fmt: str, model: nn.Module) -> int:
    """Load and return the number of tensors taken from the file."""
    if fmt not in _MAPPERS:
        raise TeacherLoadError(f"teacher checkpoint {path!r}: unknown format {fmt!r}; "
                               f"choose one of {list(CHECKPOINT_FORMATS)}")
    obj = _read_checkpoint(path, fmt)
    try:
        mapped = _MAPPERS[fmt](obj, model)
    except _LayoutMismatch as e:
        raise TeacherLoadError(f"teacher checkpoint {path!r} does not fit format {fmt!r}: {e}"
                               f"{_guess(fmt, obj, model)}") from None
    state, problems = _check(mapped, model)
    own = set(model.state_dict())
    if not any(m in own for _, m, _ in mapped if m is not None):
        keys = [f for f, m, _ in mapped if m is not None]
        raise TeacherLoadError(
            f"teacher checkpoint {path!r} does not fit format {fmt!r}: none of its keys maps onto the backbone "
            f"({type(model).__name__}); file keys: {_sample(keys)}{_guess(fmt, obj, model)}; "
            + "; ".join(problems))
    if problems:
        raise TeacherLoadError(f"teacher checkpoint {path!r} (format {fmt!r}) does not match the backbone "
                               f"({type(model).__name__}): " + "; ".join(problems) + _guess(fmt, obj, model))
    model.load_state_dict(state, strict=True)
    return sum(1 for _, m, _ in mapped if m is not None)  # every mapped tensor was loaded


def load_backbone_state(path: str, fmt: str, model: nn.Module) -> None:
    """Read ``path``, map its keys for format ``fmt`` and load them into ``model`` (a backbone without fc).

    Raises :class:`TeacherLoadError` (naming the file, the format and the keys) for a missing or unreadable
    file, a top-level structure that does not fit the format, and any missing key, unexpected key or shape
    mismatch; only ``*.num_batches_tracked`` buffers may be absent from the file.
    """
    n = _load(path, fmt, model)
    log.debug("loaded %d tensors from %s (format %s)", n, path, fmt)


# ------------------------------------------------------------------------------------------------------------
# the frozen teacher
# ------------------------------------------------------------------------------------------------------------
class FrozenTeacher(nn.Module):
    """A backbone that never trains: no parameter requires grad, every module stays in eval mode.

    ``train(True)`` (what Lightning calls on the LightningModule each epoch) leaves it in eval mode, so the
    teacher's BatchNorm always uses its running statistics. ``forward`` runs under ``torch.no_grad()`` and returns
    the backbone's embedding (``embed_dim`` wide).
    """

    def __init__(self, backbone: nn.Module, name: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.embed_dim = int(backbone.embed_dim)
        self.name = name
        self.layer_names = tuple(getattr(backbone, "layer_names", ()))
        backbone.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone(x)

    def forward_features(self, x: torch.Tensor, layers: Sequence[str] = ("pool",)) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.backbone.forward_features(x, layers)

    def assert_frozen(self) -> None:
        training = [n or "<teacher>" for n, m in self.named_modules() if m.training]
        if training:
            raise AssertionError(f"teacher modules in training mode: {_sample(training)}")
        grads = [n for n, p in self.named_parameters() if p.requires_grad]
        if grads:
            raise AssertionError(f"teacher parameters that require grad: {_sample(grads)}")

    def fingerprint(self) -> str:
        """A short hash of the weights (names, shapes, dtypes and a strided sample of every tensor).

        Device independent (the sample is exact, no floating-point reductions) and cheap even for ResNet-50x4.
        """
        h = hashlib.sha1()
        for name, t in self.backbone.state_dict().items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            flat = t.detach().reshape(-1)
            if flat.numel():
                step = max(1, flat.numel() // 256)
                sample = flat[::step][:256].to("cpu", torch.float64 if t.is_floating_point() else torch.int64)
                h.update(sample.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def build_teacher(cfg: Any) -> FrozenTeacher:
    """Build ``cfg.arch`` and load ``cfg.checkpoint`` in ``cfg.format`` (nothing for ``random``), frozen."""
    fmt = cfg.format
    backbone = build_backbone(cfg.arch, small_input=bool(getattr(cfg, "small_input", False)),
                              width_multiplier=getattr(cfg, "width_multiplier", None))
    name = getattr(cfg, "name", None) or cfg.arch
    if fmt == "random":
        log.warning("teacher %s (%s): format 'random', no checkpoint loaded (randomly initialised)", name, cfg.arch)
    else:
        path = getattr(cfg, "checkpoint", None)
        if not path:
            raise TeacherLoadError(f"teacher {name!r}: format {fmt!r} needs a checkpoint path (teacher.checkpoint)")
        path = os.path.expanduser(str(path))
        n = _load(path, fmt, backbone)
        log.info("teacher %s (%s): loaded %d tensors from %s (format %s)", name, cfg.arch, n, path, fmt)
    teacher = FrozenTeacher(backbone, name=name)
    log.info("teacher %s: embed_dim %d, fingerprint %s", name, teacher.embed_dim, teacher.fingerprint())
    return teacher


__all__ = ["CHECKPOINT_FORMATS", "FrozenTeacher", "TeacherLoadError", "build_teacher", "load_backbone_state",
           "simclr_tf_key_map"]
