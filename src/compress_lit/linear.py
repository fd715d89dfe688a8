"""`python -m compress_lit.linear checkpoint=...`: the paper's linear probe on a frozen backbone (Hydra).

Same model/data options as ``compress_lit.evaluate`` (``model_format=``, ``model.*``, ``data=``, ``layer=``);
``linear.*`` holds the probe's hyper-parameters (``linear.mode=features`` trains on precomputed centre-crop features
without augmentation, fast). Writes ``linear_results.json`` to the run directory and prints the final epoch's
top-1 (the reported number) and the best epoch's, labelled "best (not the reported number)".
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError
from .evaluation.settings import register_eval_configs
from .paths import config_dir
from .startup import check_accelerator, check_mandatory, quiet_known_noise, run_entry

log = logging.getLogger("compress_lit.linear")
CONF_DIR = config_dir()  # conf/ of the checkout, or compress_lit/conf of an installed wheel
register_eval_configs()


def run_linear(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    from .evaluate import check_model_inputs, extract_split_features
    from .data import build_datamodule
    from .evaluation.features import FeatureCache
    from .evaluation.linear import BEST_LABEL, linear_probe_on_features, run_linear_probe
    from .evaluation.loading import load_model, resolve_data_config, resolve_device

    check_mandatory(cfg)
    if cfg.linear.mode not in ("full", "features"):
        raise ConfigError(f"linear.mode={cfg.linear.mode!r} is invalid: choose full or features")
    check_model_inputs(cfg)  # as compress_lit.evaluate: checkpoint= exists, device= is there
    if cfg.linear.mode == "full":
        check_accelerator(cfg.trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    loaded = load_model(cfg.checkpoint, cfg.model_format, cfg.model)
    data_cfg = resolve_data_config(loaded.data, cfg.data)
    device = resolve_device(cfg.device)
    loaded.model.to(device)
    layer = cfg.layer or None
    lcfg = OmegaConf.to_object(cfg.linear)
    cache = FeatureCache(cfg.cache_dir) if (cfg.cache and cfg.model_format != "random") else None
    dm = build_datamodule(data_cfg)
    dm.setup("fit")
    train_x, train_y, test_x, test_y = extract_split_features(loaded, dm, data_cfg, layer, device, cache,
                                                              cfg.progress)
    if lcfg.mode == "features":
        res = linear_probe_on_features(train_x, train_y, test_x, test_y, dm.num_classes, lcfg, device=device)
        res = {k: v for k, v in res.items() if k not in ("mean", "std", "head")}
    elif lcfg.mode == "full":
        res = run_linear_probe(loaded.model, data_cfg, lcfg, layer=layer, train_feats=train_x,
                               trainer_kwargs=OmegaConf.to_container(cfg.trainer, resolve=True), device=device,
                               progress=cfg.progress, default_root_dir=str(out_dir))
    else:
        raise ValueError(f"linear.mode={lcfg.mode!r} is invalid: choose full or features")
    res.update({"checkpoint": str(cfg.checkpoint), "arch": loaded.arch, "layer": loaded.layer_name(layer),
                "data": data_cfg.name, "mode": lcfg.mode})
    (out_dir / "linear_results.json").write_text(json.dumps(res, indent=2))
    best = res.get(BEST_LABEL, {})
    print(f"\nlinear probe ({loaded.arch}, layer {res['layer']}, {data_cfg.name}, mode {lcfg.mode}): "
          f"top-1 {res['top1']:.2f}% after {res['epochs']} epochs"
          + (f"; {BEST_LABEL}: {best['top1']:.2f}% at epoch {best['epoch']}" if best else "") + "\n", flush=True)
    return res


@hydra.main(config_path=CONF_DIR, config_name="linear", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO)
    quiet_known_noise()
    run_entry("linear", lambda: run_linear(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
