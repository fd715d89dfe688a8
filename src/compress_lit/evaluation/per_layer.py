"""The linear probe of one or several layers: the paper's per-layer table (``compress_lit.linear layers=[...]``).

The paper judges AlexNet layer by layer and reports the best layer (fc7 on ImageNet, a conv layer on the transfer
sets). :func:`linear_per_layer` probes every requested layer with the paper's head and schedule:

* ``linear.mode=features``: the centre-crop train and held-out features of all the layers come from **one** pass
  of the backbone over each split (:func:`~compress_lit.evaluation.features.extract_layer_features`, cached per
  layer); each layer's head is then trained exactly as a single-layer run would train it;
* ``linear.mode=full``: the train statistics of all the layers from one pass, then one Lightning run training one
  head per layer on the same augmented batches, one backbone pass per batch
  (:class:`~compress_lit.evaluation.linear.LinearProbe` with several heads).

Either way a layer's numbers are those of a single-layer run (same head initialisation, statistics, batches and
gradients). A conv map becomes a vector by average-pooling it to a grid of about ``linear.pooled_dim`` numbers
(:func:`~compress_lit.evaluation.features.vectorize`). Each layer reports its **final** epoch's top-1;
:func:`per_layer_table` prints them in one row, a column per layer, the best layer in bold.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence

from omegaconf import OmegaConf

from ..runtime.config import ConfigError
from ..data.datamodule import bank_loader
from .ten_crop import LABEL as TEN_CROP_LABEL


def resolve_layers(model, layer: Optional[str], layers: Optional[Sequence[str]], arch: str = "") -> list:
    """The layers to probe: ``layers=[...]`` (checked against ``model.layer_names``), ``layer=all`` or
    ``layers=[all]`` (every layer, in the network's order), ``layer=<name>``, or ``[None]`` (the embedding)."""
    names = list(getattr(model, "layer_names", ()) or ())
    what = arch or type(model).__name__
    if layer and layers:
        raise ConfigError(f"layer={layer} and layers={list(layers)} are both set: use one of them")
    if layer == "all" or (layers is not None and list(layers) == ["all"]):
        if not names:
            raise ConfigError(f"layer=all: {what} names no layers (it has no layer_names)")
        return names
    if layers is not None:
        if not layers:
            raise ConfigError("layers=[] is empty: list layers, e.g. layers=[conv1,conv5,fc7], or set layer=all")
        bad = [x for x in layers if x not in names]
        if bad:
            raise ConfigError(f"layers={list(layers)}: {what} has no layer {bad[0]!r}; choose from {names} (or all)")
        return list(dict.fromkeys(layers))
    if layer:
        if names and layer not in names:
            raise ConfigError(f"layer={layer}: {what} has no such layer; choose one of {names} (or all)")
        return [layer]
    return [None]


def layer_split_features(loaded, dm, data_cfg, layers: Sequence[Optional[str]], device, cache, progress: bool,
                         pooled_dim: Optional[int], splits: Sequence[str] = ("train", "val"),
                         ten_crop: bool = False) -> dict[str, dict]:
    """``{split: {layer: (features, labels)}}`` of the centre-crop train split and the held-out split (10-crop
    with ``ten_crop``), every layer from one pass over each split, cached per (layer, split, transform)."""
    from .features import describe_loader, extract_layer_features, feature_cache_key
    from .ten_crop import ten_crop_loader

    data_key = json.dumps(OmegaConf.to_container(data_cfg, resolve=True), sort_keys=True)
    loaders = {"train": lambda: bank_loader(dm),
               "val": (lambda: ten_crop_loader(dm, data_cfg)) if ten_crop else dm.val_dataloader}
    out = {}
    for split in splits:
        loader = loaders[split]()
        keys = ({name: feature_cache_key(loaded.identity, loaded.layer_name(name), split, data=data_key,
                                         pooled_dim=pooled_dim, **describe_loader(loader)) for name in layers}
                if cache is not None else None)
        out[split] = extract_layer_features(loaded.model, loader, layers, device, progress, cache=cache,
                                            cache_keys=keys, desc=f"{split} features", pooled_dim=pooled_dim)
    return out


def linear_per_layer(loaded, dm, data_cfg, layers: Sequence[Optional[str]], lcfg, device, cache=None,
                     progress: bool = False, ten_crop: bool = False, trainer_kwargs: Optional[dict] = None,
                     default_root_dir: Optional[str] = None) -> tuple[dict, dict]:
    """The probe of each of ``layers``: ``({layer: results}, {layer: (train_x, train_y, test_x, test_y)})`` —
    the second holds the exact features scored (``features`` mode; ``full`` mode: the train features of the
    statistics only, test ``None``)."""
    from .linear import linear_probe_on_features, run_linear_probe

    layers = list(layers)
    splits = ("train", "val") if lcfg.mode == "features" else ("train",)
    feats = layer_split_features(loaded, dm, data_cfg, layers, device, cache, progress, lcfg.pooled_dim, splits,
                                 ten_crop)
    scored = {name: (*feats["train"][name], *(feats["val"][name] if "val" in feats else (None, None)))
              for name in layers}
    if lcfg.mode == "features":
        results = {}
        for name in layers:
            tx, ty, vx, vy = scored[name]
            res = linear_probe_on_features(tx, ty, vx, vy, dm.num_classes, lcfg, device=device)
            results[name] = {k: v for k, v in res.items() if k not in ("mean", "std", "head")}
    elif lcfg.mode == "full":
        results = run_linear_probe(loaded.model, data_cfg, lcfg, layers=layers,
                                   train_feats={name: scored[name][0] for name in layers},
                                   trainer_kwargs=trainer_kwargs, device=device, progress=progress,
                                   default_root_dir=default_root_dir, ten_crop=ten_crop)
    else:
        raise ConfigError(f"linear.mode={lcfg.mode!r} is invalid: choose full or features")
    for name in layers:
        results[name]["feature_dim"] = int(scored[name][0].shape[1])
    return results, scored


def best_layer(results: Mapping[Any, Mapping[str, Any]]) -> Any:
    """The layer with the highest final-epoch top-1 (the first in the network's order on a tie)."""
    return max(results, key=lambda name: (results[name]["top1"], -list(results).index(name)))


def per_layer_table(results: Mapping[str, Mapping[str, Any]], label: str, ten_crop: bool = False) -> str:
    """The paper's per-layer row: a column per layer, the final epoch's top-1, the best layer in bold (every
    layer tied with it too); the header says the epoch count and "10-crop" when the held-out images were
    10-cropped."""
    names = list(results)
    best = best_layer(results)
    tied = [n for n in names if n != best and results[n]["top1"] == results[best]["top1"]]
    epochs = sorted({int(r["epochs"]) for r in results.values()})
    scoring = TEN_CROP_LABEL if ten_crop else "centre crop"
    head = (f"linear top-1 (%), final epoch ({'/'.join(map(str, epochs))}), {scoring}")
    cells = [f"**{results[n]['top1']:.2f}**" if n == best or n in tied else f"{results[n]['top1']:.2f}"
             for n in names]
    dims = [str(results[n].get("feature_dim", "")) for n in names]
    w = [max(len(a), len(b), len(c)) for a, b, c in zip(names, cells, dims)]
    first = max(len(head), len(label), len("feature dim"))
    lines = [f"| {head:<{first}} | " + " | ".join(f"{n:>{x}}" for n, x in zip(names, w)) + " |",
             f"|{'-' * (first + 2)}|" + "|".join("-" * (x + 1) + ":" for x in w) + "|",
             f"| {label:<{first}} | " + " | ".join(f"{c:>{x}}" for c, x in zip(cells, w)) + " |",
             f"| {'feature dim':<{first}} | " + " | ".join(f"{d:>{x}}" for d, x in zip(dims, w)) + " |"]
    ties = f"; tied: {', '.join(tied)}" if tied else ""
    lines.append(f"\nbest layer: {best} ({results[best]['top1']:.2f}%, in bold{ties}); every number is its layer's "
                 f"final epoch{' (' + TEN_CROP_LABEL + ')' if ten_crop else ''}")
    return "\n".join(lines)


__all__ = ["best_layer", "layer_split_features", "linear_per_layer", "per_layer_table", "resolve_layers"]
