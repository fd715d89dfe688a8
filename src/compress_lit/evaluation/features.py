"""Feature extraction shared by every evaluation.

* the model is frozen: every module is put in eval mode for the pass (and restored exactly afterwards, module by
  module), gradients are off;
* any layer: ``layer=None`` is the model's embedding (``forward``); otherwise ``forward_features(x, (layer,))``
  (AlexNet ``conv1``..``fc7``, ResNet ``stem``/``layer1``..``layer4``/``pool``, MobileNet ``features``/``pool``);
  spatial maps ``N x C x H x W`` are global-average-pooled (or, with ``pooled_dim``, average-pooled to a grid of
  about that many numbers: :func:`vectorize`, the linear probe's per-layer convention), anything else is
  flattened to ``N x D``; several layers come from one forward pass (:func:`extract_layer_features`);
* 10-crop batches ``B x crops x C x H x W`` give ``B x crops x D`` features;
* batched over a loader yielding ``(x, y, index)``; results are returned in dataset order (sorted by ``index``);
* DDP: each process extracts its shard and passes it through ``gather`` (a callable concatenating a tensor over
  processes along dim 0, e.g. :func:`distributed_gather`); :func:`merge_shards` then sorts by index and drops the
  duplicates a ``DistributedSampler`` pads with;
* optional on-disk cache (:class:`FeatureCache`) keyed by (checkpoint, layer, split, transform, …) so that a second
  evaluation of the same model does not run it again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Gather = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------- eval mode
@contextlib.contextmanager
def frozen_eval(model: Any) -> Iterator[None]:
    """Every submodule in eval mode inside the block; each module's own ``training`` flag restored after."""
    if not isinstance(model, nn.Module):
        owner = getattr(model, "__self__", None)  # a bound method such as module.forward
        if isinstance(owner, nn.Module):
            model = owner
        else:
            yield
            return
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def pool_features(t: torch.Tensor) -> torch.Tensor:
    """``N x C x H x W`` -> global average pool -> ``N x C``; ``N x D`` unchanged; other shapes flattened."""
    if t.ndim == 4:
        return F.adaptive_avg_pool2d(t, 1).flatten(1)
    return t.flatten(1) if t.ndim != 2 else t


def layer_fn(model: Any, layer: Optional[str] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function mapping a batch to ``N x D`` features of ``layer`` (``None``: the embedding, ``forward``)."""
    if layer is None:
        return lambda x: pool_features(model(x))
    names = tuple(getattr(model, "layer_names", ()))
    if not hasattr(model, "forward_features"):
        raise ValueError(f"layer={layer!r} requested but {type(model).__name__} has no forward_features")
    if names and layer not in names:
        raise ValueError(f"unknown layer {layer!r} for {type(model).__name__}; choose one of {list(names)}")
    return lambda x: pool_features(model.forward_features(x, (layer,))[layer])


def pooled_grid(channels: int, height: int, width: int, pooled_dim: int) -> int:
    """Side ``s`` of the ``s x s`` grid a ``channels x height x width`` map is average-pooled to so that it gives
    about ``pooled_dim`` numbers: ``s = round(sqrt(pooled_dim / channels))``, at least 1 and at most the map's
    shorter side (a map is never upsampled). AlexNet at 224 px with ``pooled_dim=9216``: conv1 64 x 55 x 55 ->
    12 x 12 (9,216), conv2 192 x 27 x 27 -> 7 x 7 (9,408), conv3 384 x 13 x 13 -> 5 x 5 (9,600), conv4 and conv5
    256 x 13 x 13 -> 6 x 6 (9,216)."""
    s = int(round(math.sqrt(pooled_dim / max(1, channels))))
    return max(1, min(s, height, width))


def vectorize(t: torch.Tensor, pooled_dim: Optional[int] = None) -> torch.Tensor:
    """One vector per sample from a layer's output. ``N x C x H x W`` maps: ``pooled_dim=None`` global average
    pool (``N x C``, :func:`pool_features`); otherwise adaptive average pool to the :func:`pooled_grid` of
    ``pooled_dim`` and flatten (``N x C*s*s``, channel-major). Anything else as :func:`pool_features`."""
    if t.ndim == 4 and pooled_dim:
        s = pooled_grid(t.shape[1], t.shape[2], t.shape[3], int(pooled_dim))
        return F.adaptive_avg_pool2d(t, s).flatten(1)
    return pool_features(t)


def layers_fn(model: Any, layers: Sequence[Optional[str]], pooled_dim: Optional[int] = None
              ) -> Callable[[torch.Tensor], dict[Optional[str], torch.Tensor]]:
    """The function mapping a batch to ``{layer: N x D}`` for several layers in **one** forward pass
    (``forward_features(x, layers)``); ``None`` stands for the embedding (``forward``). Spatial maps are turned
    into vectors by :func:`vectorize` with ``pooled_dim``. A ``B x crops x C x H x W`` batch (10-crop) gives
    ``B x crops x D`` features."""
    layers = list(layers)
    named = [name for name in layers if name is not None]
    if named:
        layer_fn(model, named[0])  # the checks: forward_features exists, the names are known
        for name in named[1:]:
            layer_fn(model, name)

    def run(x: torch.Tensor) -> dict[Optional[str], torch.Tensor]:
        crops = x.shape[1] if x.ndim == 5 else None
        if crops is not None:
            x = x.flatten(0, 1)
        out: dict[Optional[str], torch.Tensor] = {}
        if named:
            maps = model.forward_features(x, tuple(named))
            out.update({name: vectorize(maps[name], pooled_dim) for name in named})
        if None in layers:
            out[None] = vectorize(model(x), pooled_dim)
        if crops is not None:
            out = {k: v.reshape(-1, crops, *v.shape[1:]) for k, v in out.items()}
        return {name: out[name] for name in layers}

    return run


# ---------------------------------------------------------------------------------------------- DDP helpers
def merge_shards(feats: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort gathered rows by dataset index and keep one row per index (DistributedSampler pads by repeating)."""
    indices = torch.as_tensor(indices).long().reshape(-1)
    order = torch.argsort(indices, stable=True)
    idx_sorted = indices[order]
    keep = torch.ones_like(idx_sorted, dtype=torch.bool)
    keep[1:] = idx_sorted[1:] != idx_sorted[:-1]
    order = order[keep]
    return feats[order], torch.as_tensor(labels)[order]


def distributed_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` over all processes of the default ``torch.distributed`` group along dim 0.

    Shards may differ in length (padded to the largest for ``all_gather``, then trimmed). Without an initialised
    process group it returns ``t``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    world = dist.get_world_size()
    device = t.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    t = t.to(device)
    n = torch.tensor([t.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    biggest = max(sizes)
    pad = torch.zeros((biggest - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=device)
    padded = torch.cat([t, pad])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu()


# ---------------------------------------------------------------------------------------------------- cache
def describe_loader(loader) -> dict[str, Any]:
    """What, besides the model, determines the features of ``loader``: its dataset's transform and size."""
    ds = getattr(loader, "dataset", None)
    base = ds
    while base is not None and not hasattr(base, "transform") and hasattr(base, "dataset"):
        base = base.dataset  # torch Subset
    out = {"transform": repr(getattr(base, "transform", None)), "n": len(ds) if ds is not None else None,
           "dataset": type(base).__name__ if base is not None else None}
    describe = getattr(loader, "describe", None)  # data.loader=dali: its own pipeline makes the pixels
    if callable(describe):
        out["loader"] = describe()
    return out


def checkpoint_identity(path: str | os.PathLike | None) -> str:
    """A checkpoint's identity for cache keys: resolved path + size + modification time (a rewritten file, a
    new key). A string that is not a file is used as given (e.g. ``"random:resnet18:seed0"``)."""
    if path is None:
        return "none"
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        st = p.stat()
        return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return str(path)


def feature_cache_key(checkpoint: str | os.PathLike | None, layer: Optional[str], split: str,
                      transform: Any = None, **extra: Any) -> str:
    """A hex key for (checkpoint, layer, split, transform[, extra…]); any change gives a different key."""
    payload = {"checkpoint": checkpoint_identity(checkpoint), "layer": layer or "embedding", "split": split,
               "transform": transform if isinstance(transform, (str, type(None))) else repr(transform),
               **{k: extra[k] for k in sorted(extra)}}
    blob = json.dumps(payload, sort_keys=True, default=repr)
    return hashlib.sha1(blob.encode()).hexdigest()[:24]


class FeatureCache:
    """Features on disk under ``root/<key>.pt`` (``{'feats', 'labels', 'meta'}``), written atomically."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.expanduser(str(root)))

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            blob = torch.load(p, map_location="cpu", weights_only=True)
            return blob["feats"], blob["labels"]
        except Exception:  # a truncated or foreign file: recompute
            return None

    def save(self, key: str, feats: torch.Tensor, labels: torch.Tensor, meta: Mapping[str, Any] | None = None):
        self.root.mkdir(parents=True, exist_ok=True)
        p = self.path(key)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        torch.save({"feats": feats.contiguous(), "labels": labels.contiguous(), "meta": dict(meta or {})}, tmp)
        os.replace(tmp, p)


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# --------------------------------------------------------------------------------------------- extraction
@torch.no_grad()
def extract_features(model: nn.Module | Callable, loader, device: str | torch.device = "cpu",
                     progress: bool = False, *, layer: Optional[str] = None, gather: Optional[Gather] = None,
                     cache: FeatureCache | str | os.PathLike | None = None, cache_key: Optional[str] = None,
                     desc: str = "features", pooled_dim: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen ``model`` over ``loader`` (yielding ``(x, y, index)``); return ``(features, labels)`` in
    dataset-index order, features ``N x D`` float32 on the CPU (``N x crops x D`` when the loader yields
    ``B x crops x C x H x W`` batches, as the 10-crop loader does).

    ``layer``: ``None`` for the embedding, else a name of ``model.layer_names`` (spatial maps are average-pooled:
    globally, or to about ``pooled_dim`` numbers, :func:`vectorize`).
    ``gather``: under DDP, a callable concatenating a tensor over processes (each process runs its shard).
    ``cache`` + ``cache_key`` (see :func:`feature_cache_key`): reuse features saved by an earlier call; the model is
    not run at all on a hit. Only rank 0 writes the cache.
    """
    out = extract_layer_features(model, loader, [layer], device, progress, gather=gather, cache=cache,
                                 cache_keys={layer: cache_key}, desc=desc, pooled_dim=pooled_dim)
    return out[layer]


@torch.no_grad()
def extract_layer_features(model: nn.Module | Callable, loader, layers: Sequence[Optional[str]],
                           device: str | torch.device = "cpu", progress: bool = False, *,
                           gather: Optional[Gather] = None, cache: FeatureCache | str | os.PathLike | None = None,
                           cache_keys: Optional[Mapping[Optional[str], Optional[str]]] = None,
                           desc: str = "features", pooled_dim: Optional[int] = None
                           ) -> dict[Optional[str], tuple[torch.Tensor, torch.Tensor]]:
    """:func:`extract_features` for several layers in one pass over ``loader``: ``{layer: (features, labels)}``.

    Each layer has its own cache entry (``cache_keys[layer]``); the model runs only when some layer misses, and
    then once per batch for all the missing layers (:func:`layers_fn`).
    """
    layers = list(dict.fromkeys(layers))
    if cache is not None and not isinstance(cache, FeatureCache):
        cache = FeatureCache(cache)
    keys = dict(cache_keys or {})
    out: dict[Optional[str], tuple[torch.Tensor, torch.Tensor]] = {}
    if cache is not None:
        for name in layers:
            hit = cache.load(keys[name]) if keys.get(name) is not None else None
            if hit is not None:
                out[name] = hit
    todo = [name for name in layers if name not in out]
    if not todo:
        return out
    fn = layers_fn(model, todo, pooled_dim)
    feats: dict[Optional[str], list[torch.Tensor]] = {name: [] for name in todo}
    labels, indices = [], []
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc=desc, leave=False)
    with frozen_eval(model):
        for x, y, idx in it:
            for name, f in fn(x.to(device, non_blocking=True)).items():
                feats[name].append(f.float().cpu())
            labels.append(torch.as_tensor(y))
            indices.append(torch.as_tensor(idx))
    fs = {name: torch.cat(feats[name]) if feats[name] else torch.zeros(0, 0) for name in todo}
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    i = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    if gather is not None:  # in this order: each layer's features, the labels, the indices
        fs = {name: gather(f) for name, f in fs.items()}
        y, i = gather(y), gather(i)
    for name in todo:
        f, yy = merge_shards(fs[name], y, i)
        if cache is not None and keys.get(name) is not None and _is_rank_zero():
            cache.save(keys[name], f, yy, {"layer": name, "pooled_dim": pooled_dim, **describe_loader(loader)})
        out[name] = (f, yy)
    return {name: out[name] for name in layers}


def save_features(path, train_x, train_y, test_x, test_y) -> None:
    """Write the exact features an evaluation scored, for checking with other tools."""
    np.savez(path, train_x=np.asarray(train_x), train_y=np.asarray(train_y),
             test_x=np.asarray(test_x), test_y=np.asarray(test_y))
