"""What ``python -m compress_lit.evaluate`` runs: the checks of its inputs, the model's (or the raw pixels')
features of both splits, the evaluations of ``eval=[...]`` (k-NN, clustering, linear probe, VOC07), and the
results written to the run folder."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ..runtime.config import ConfigError
from ..runtime.startup import check_accelerator, check_device, check_file, check_mandatory
from .settings import EVALUATIONS, MODEL_FORMATS

# "pixels": no model, the flattened normalised image itself (the floor every learned embedding should beat)
EVAL_FORMATS = (*MODEL_FORMATS, "pixels")


def _check(cfg: DictConfig) -> None:
    """Start-up checks (before the model or any data is loaded): ConfigErrors naming the key."""
    if cfg.get("model_format") in ("pixels", "timm") and OmegaConf.is_missing(cfg, "checkpoint"):
        cfg.checkpoint = ""  # the raw pixels read no file; a timm model's weights may come from the HF cache
    check_mandatory(cfg)
    if cfg.model_format not in EVAL_FORMATS:
        raise ConfigError(f"model_format={cfg.model_format!r} is invalid: choose one of {list(EVAL_FORMATS)}")
    if cfg.model_format == "pixels" and cfg.layer:
        raise ConfigError(f"layer={cfg.layer} is meaningless with model_format=pixels (the image has no layers)")
    bad = [e for e in cfg.eval if e not in EVALUATIONS]
    if bad:
        raise ConfigError(f"eval={list(cfg.eval)} has unknown entries {bad}: choose from {list(EVALUATIONS)}")
    if "voc" in cfg.eval and not cfg.voc.root:
        raise ConfigError("eval includes voc: set voc.root=<folder holding VOCdevkit/VOC2007>")
    if cfg.linear.mode not in ("full", "features"):
        raise ConfigError(f"linear.mode={cfg.linear.mode!r} is invalid: choose full or features")
    if cfg.linear.pooled_dim is not None and cfg.linear.pooled_dim < 1:
        raise ConfigError(f"linear.pooled_dim={cfg.linear.pooled_dim} must be a positive number of features "
                          f"(or null: global average pooling)")
    check_model_inputs(cfg)
    if "linear" in cfg.eval and cfg.linear.mode == "full":
        check_accelerator(cfg.trainer)


def check_model_inputs(cfg: DictConfig) -> None:
    """``checkpoint=`` names an existing file (``model_format=random`` needs none, ``timm`` may read the Hugging Face
    cache instead) and ``device=`` exists here."""
    if cfg.model_format not in ("random", "pixels", "timm") or cfg.checkpoint:
        check_file("checkpoint", cfg.checkpoint, "checkpoint file")
    check_device(cfg.device)


def confusion_title(res) -> str:
    """The confusion matrix shows one k-means run (the first seed's); its title says so, beside the mean over the
    seeds that the results table reports."""
    seed, acc = res.seeds[0], res.accs[0]
    title = f"cluster -> class (val), k-means seed {seed}: alignment {acc:.2f}%"
    if len(res.seeds) > 1:
        title += f"\n(this seed; mean over the {len(res.seeds)} seeds {res.acc_mean:.2f} ± {res.acc_std:.2f}%)"
    return title


def extract_split_features(loaded, dm, data_cfg, layer, device, cache, progress, ten_crop: bool = False):
    """(train_x, train_y, test_x, test_y) of the centre-crop train split and the val split, cached.
    ``ten_crop``: the val split 10-cropped, ``test_x`` then ``N x 10 x D`` (evaluation/ten_crop.py)."""
    from .features import describe_loader, extract_features, feature_cache_key
    from ..data.datamodule import bank_loader
    from .ten_crop import ten_crop_loader

    data_key = json.dumps(OmegaConf.to_container(data_cfg, resolve=True), sort_keys=True)
    out = []
    val_loader = ten_crop_loader(dm, data_cfg) if ten_crop else dm.val_dataloader()
    for split, loader in (("train", bank_loader(dm)), ("val", val_loader)):
        key = (feature_cache_key(loaded.identity, loaded.layer_name(layer), split, data=data_key,
                                 **describe_loader(loader)) if cache is not None else None)
        out.extend(extract_features(loaded.model, loader, device, progress, layer=layer, cache=cache, cache_key=key,
                                    desc=f"{split} features"))
    return out


def load_pixels(data_overrides):
    """``model_format=pixels``: the raw-pixel "model" (evaluation/pixels.py) and its data config, which only
    ``data=`` gives (there is no checkpoint to record one). Grey tensor data sets keep one channel."""
    from ..data.transforms import TENSOR_DATASETS
    from .loading import LoadedModel, resolve_data_config
    from .pixels import RawPixels

    data_cfg = resolve_data_config(None, data_overrides)
    model = RawPixels(grey=data_cfg.name in TENSOR_DATASETS)
    return LoadedModel(model=model, arch="pixels", identity="pixels", name="raw pixels",
                       embedding="image"), data_cfg


def results_markdown(results: dict[str, Any], header: str = "") -> str:
    rows = []
    crop = ", 10-crop" if results.get("ten_crop") else ""  # every number of the held-out split says how it was cut
    if "knn" in results:
        for key, v in results["knn"].items():
            top, k = key.split("_k")
            rows.append(("k-NN", f"{top.replace('top', 'top-')} (k={k}{crop})", f"{v:.2f}"))
    if "cluster" in results:
        c = results["cluster"]
        n = len(c["seeds"])
        rows.append(("cluster alignment", f"accuracy (k={c['k']}, {n} seeds{crop})",
                     f"{c['acc_mean']:.2f} ± {c['acc_std']:.2f}"))
        rows.append(("cluster alignment", f"NMI (val{crop})", f"{c['nmi_mean']:.4f} ± {c['nmi_std']:.4f}"))
        rows.append(("cluster alignment", f"ARI (val{crop})", f"{c['ari_mean']:.4f} ± {c['ari_std']:.4f}"))
    if "linear" in results:
        li = results["linear"]
        rows.append(("linear", f"top-1 (final epoch {li['epochs']}{crop})", f"{li['top1']:.2f}"))
        if "top5" in li:
            rows.append(("linear", f"top-5 (final epoch{crop})", f"{li['top5']:.2f}"))
        best = li.get("best (not the reported number)")
        if best:
            rows.append(("linear", f"best (not the reported number), epoch {best['epoch']}{crop}",
                         f"{best['top1']:.2f}"))
    if "voc" in results:
        rows.append(("VOC07 classification", f"mAP ({results['voc']['ap_kind']} AP, %)", f"{results['voc']['mAP']:.2f}"))
    w = [max(len(r[i]) for r in rows + [("evaluation", "metric", "value")]) for i in range(3)]
    lines = [header] if header else []
    lines.append(f"| {'evaluation':<{w[0]}} | {'metric':<{w[1]}} | {'value':>{w[2]}} |")
    lines.append(f"|{'-' * (w[0] + 2)}|{'-' * (w[1] + 2)}|{'-' * (w[2] + 1)}:|")
    lines += [f"| {a:<{w[0]}} | {b:<{w[1]}} | {c:>{w[2]}} |" for a, b, c in rows]
    return "\n".join(lines)


def run_evaluate(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run the evaluations of ``cfg`` (an ``EvaluateConfig``); write the outputs to ``out_dir``; return results.
    An evaluation that fails leaves none of its outputs behind (no half-filled folder: features without results)."""
    out_dir = Path(out_dir)
    before = set(out_dir.iterdir()) if out_dir.is_dir() else set()
    try:
        return _evaluate(cfg, out_dir)
    except BaseException:
        import shutil

        for p in (set(out_dir.iterdir()) if out_dir.is_dir() else set()) - before:
            if p.suffix != ".log":
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise


def _evaluate(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    from ..data import build_datamodule
    from .features import FeatureCache, save_features
    from .loading import denormalizer, load_model, resolve_data_config, resolve_device
    from .ten_crop import crop_mean_features

    _check(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.model_format == "pixels":
        loaded, data_cfg = load_pixels(cfg.data)
    else:
        loaded = load_model(cfg.checkpoint, cfg.model_format, cfg.model)
        data_cfg = resolve_data_config(loaded.data, cfg.data)
    device = resolve_device(cfg.device)
    loaded.model.to(device)
    layer = cfg.layer or None
    cache = FeatureCache(cfg.cache_dir) if (cfg.cache and cfg.model_format not in ("random", "pixels")) else None
    results: dict[str, Any] = {"checkpoint": str(cfg.checkpoint), "model_format": cfg.model_format,
                               "arch": loaded.arch, "layer": loaded.layer_name(layer), "data": data_cfg.name}
    if any(e in cfg.eval for e in ("knn", "cluster", "linear")):
        dm = build_datamodule(data_cfg)
        dm.setup("fit")
        t0 = time.perf_counter()
        train_x, train_y, test_x, test_y = extract_split_features(loaded, dm, data_cfg, layer, device, cache,
                                                                  cfg.progress, ten_crop=cfg.ten_crop)
        query_x = crop_mean_features(test_x)  # 10-crop: the mean of the crops' L2-normalised features
        results.update({"num_train": int(len(train_y)), "num_val": int(len(test_y)), "ten_crop": bool(cfg.ten_crop),
                        "num_classes": int(dm.num_classes), "feature_dim": int(train_x.shape[1]),
                        "feature_seconds": round(time.perf_counter() - t0, 3)})
        if cfg.save_features:
            save_features(out_dir / "features.npz", train_x.numpy(), train_y.numpy(), test_x.numpy(),
                          test_y.numpy())

    if "knn" in cfg.eval:
        from .knn import knn_evaluate

        results["knn"] = knn_evaluate(train_x, train_y, query_x, test_y, ks=list(cfg.knn.k),
                                      num_classes=dm.num_classes, weighting=cfg.knn.weighting,
                                      temperature=cfg.knn.temperature, backend=cfg.knn.backend, device=device)
    if "cluster" in cfg.eval:
        from .cluster import cluster_alignment, plot_cluster_grid, plot_confusion

        c = cfg.cluster
        res = cluster_alignment(train_x, train_y, query_x, test_y, num_classes=dm.num_classes, k=c.k, niter=c.niter,
                                seeds=c.seeds, normalize=c.normalize)
        results["cluster"] = res.summary()
        if c.pictures:
            grid = plot_cluster_grid(out_dir / "cluster_grid.png", res.val_clusters, res.mapping, dm.class_names,
                                     dataset=dm.val_dataset, denormalize=denormalizer(data_cfg.mean, data_cfg.std),
                                     rows=c.rows, cols=c.cols, seed=c.picture_seed)
            conf = plot_confusion(out_dir / "cluster_confusion.png", res.val_clusters, test_y.numpy(), res.mapping,
                                  dm.class_names, k=res.k, title=confusion_title(res))
            results["cluster"]["pictures"] = {"grid": Path(grid["path"]).name, "confusion": Path(conf["path"]).name,
                                              "grid_clusters": grid["clusters"], "grid_labels": grid["labels"]}
    if "linear" in cfg.eval:
        from .linear import linear_probe_on_features, run_linear_probe

        lcfg = OmegaConf.to_object(cfg.linear)
        val = "10-crop val (softmax averaged)" if cfg.ten_crop else "centre-crop val"
        if layer is not None:  # a layer's map is pooled to ~linear.pooled_dim numbers for the probe: its own features
            from .per_layer import linear_per_layer

            res = linear_per_layer(loaded, dm, data_cfg, [layer], lcfg, device, cache, cfg.progress,
                                   ten_crop=cfg.ten_crop,
                                   trainer_kwargs=OmegaConf.to_container(cfg.trainer, resolve=True),
                                   default_root_dir=str(out_dir / "linear"))[0][layer]
        elif lcfg.mode == "features":
            res = linear_probe_on_features(train_x, train_y, test_x, test_y, dm.num_classes, lcfg, device=device)
            res = {k: v for k, v in res.items() if k not in ("mean", "std", "head")}
        else:
            res = run_linear_probe(loaded.model, data_cfg, lcfg, layer=layer, train_feats=train_x,
                                   trainer_kwargs=OmegaConf.to_container(cfg.trainer, resolve=True), device=device,
                                   progress=cfg.progress, default_root_dir=str(out_dir / "linear"),
                                   ten_crop=cfg.ten_crop)
        res["protocol"] = (f"features (precomputed centre-crop train features, no augmentation; {val})"
                           if lcfg.mode == "features" else
                           f"full (frozen backbone, RandomResizedCrop + flip; {val})")
        results["linear"] = res
    if "voc" in cfg.eval:
        from .voc import evaluate_voc07

        v = cfg.voc
        results["voc"] = evaluate_voc07(loaded.model, v.root, device, layer=layer,
                                        image_size=v.image_size or data_cfg.image_size,
                                        resize_size=v.resize_size or data_cfg.resize_size, mean=data_cfg.mean,
                                        std=data_cfg.std, batch_size=data_cfg.eval_batch_size,
                                        num_workers=data_cfg.num_workers, costs=list(v.costs), ap=v.ap,
                                        normalize=v.normalize, cache=cache, cache_identity=loaded.identity,
                                        progress=cfg.progress)

    header = f"## {loaded.name} ({loaded.arch}, layer {results['layer']})"
    if "num_train" in results:
        header += (f" on {data_cfg.name}: {results['num_train']} train / {results['num_val']} val, "
                   f"{results['num_classes']} classes")
    header += "\n"
    table = results_markdown(results, header)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    (out_dir / "results.md").write_text(table + "\n")
    print("\n" + table + "\n", flush=True)
    return results


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
