"""What ``python -m compress_lit.linear`` runs: the linear probe of one layer, or the per-layer table, of a frozen
backbone, written to the run folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ..runtime.config import ConfigError
from ..runtime.precision import apply_precision
from ..runtime.startup import check_accelerator, check_mandatory


def run_linear(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    from ..data import build_datamodule
    from .features import FeatureCache, save_features
    from .linear import BEST_LABEL
    from .loading import load_model, resolve_data_config, resolve_device
    from .per_layer import best_layer, linear_per_layer, per_layer_table, resolve_layers
    from .ten_crop import LABEL as TEN_CROP
    from .run import check_model_inputs

    check_mandatory(cfg)
    if cfg.linear.mode not in ("full", "features"):
        raise ConfigError(f"linear.mode={cfg.linear.mode!r} is invalid: choose full or features")
    if cfg.linear.pooled_dim is not None and cfg.linear.pooled_dim < 1:
        raise ConfigError(f"linear.pooled_dim={cfg.linear.pooled_dim} must be a positive number of features "
                          f"(or null: global average pooling)")
    check_model_inputs(cfg)  # as compress_lit.evaluate: checkpoint= exists, device= is there
    if cfg.linear.mode == "full":
        check_accelerator(cfg.trainer)
        apply_precision(cfg.trainer)  # trainer.precision=auto, as every entry point that builds a Trainer
    pl.seed_everything(cfg.seed, workers=True)
    loaded = load_model(cfg.checkpoint, cfg.model_format, cfg.model)
    layers = resolve_layers(loaded.model, cfg.layer, cfg.layers, loaded.arch)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_cfg = resolve_data_config(loaded.data, cfg.data)
    device = resolve_device(cfg.device)
    loaded.model.to(device)
    lcfg = OmegaConf.to_object(cfg.linear)
    cache = FeatureCache(cfg.cache_dir) if (cfg.cache and cfg.model_format != "random") else None
    dm = build_datamodule(data_cfg)
    dm.setup("fit")
    per_layer, scored = linear_per_layer(loaded, dm, data_cfg, layers, lcfg, device, cache, cfg.progress,
                                         ten_crop=cfg.ten_crop,
                                         trainer_kwargs=OmegaConf.to_container(cfg.trainer, resolve=True),
                                         default_root_dir=str(out_dir))
    scoring = TEN_CROP if cfg.ten_crop else "centre crop"
    common = {"checkpoint": str(cfg.checkpoint), "arch": loaded.arch, "data": data_cfg.name, "mode": lcfg.mode,
              "ten_crop": bool(cfg.ten_crop), "pooled_dim": lcfg.pooled_dim}
    if lcfg.mode == "features":  # the exact features each head was trained and scored on
        for name, (tx, ty, vx, vy) in scored.items():
            fname = "features.npz" if len(layers) == 1 else f"features_{loaded.layer_name(name)}.npz"
            save_features(out_dir / fname, tx.numpy(), ty.numpy(), vx.numpy(), vy.numpy())
    if len(layers) == 1:
        res = {**per_layer[layers[0]], **common, "layer": loaded.layer_name(layers[0])}
        (out_dir / "linear_results.json").write_text(json.dumps(res, indent=2))
        best = res.get(BEST_LABEL, {})
        print(f"\nlinear probe ({loaded.arch}, layer {res['layer']}, {data_cfg.name}, mode {lcfg.mode}, {scoring}): "
              f"top-1 {res['top1']:.2f}% after {res['epochs']} epochs"
              + (f"; {BEST_LABEL}: {best['top1']:.2f}% at epoch {best['epoch']}" if best else "") + "\n", flush=True)
        return res
    by_name = {loaded.layer_name(name): r for name, r in per_layer.items()}
    label = f"{loaded.name} ({loaded.arch}) on {data_cfg.name}, mode {lcfg.mode}"
    table = per_layer_table(by_name, label, ten_crop=bool(cfg.ten_crop))
    res = {**common, "layers": by_name, "best_layer": best_layer(by_name), "table": table}
    (out_dir / "linear_results.json").write_text(json.dumps(res, indent=2))
    (out_dir / "linear_results.md").write_text(table + "\n")
    print("\n" + table + "\n", flush=True)
    return res
