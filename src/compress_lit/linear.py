"""`python -m compress_lit.linear checkpoint=...`: the paper's linear probe on a frozen backbone (Hydra).

Same model/data options as ``compress_lit.evaluate`` (``model_format=``, ``model.*``, ``data=``, ``layer=``);
``linear.*`` holds the probe's hyper-parameters (``linear.mode=features`` trains on precomputed centre-crop features
without augmentation, fast). Writes ``linear_results.json`` to the run directory and prints the final epoch's
top-1 (the reported number) and the best epoch's, labelled "best (not the reported number)".

``layers=[conv1,conv2,...]`` or ``layer=all``: the paper's per-layer table, one head per layer over one backbone
pass (:mod:`compress_lit.evaluation.per_layer`); prints a row with a column per layer, the best in bold, and writes
``linear_results.md``. Conv maps are average-pooled to about ``linear.pooled_dim`` (9,216) numbers.
``ten_crop=true`` scores the held-out images by 10-crop (:mod:`compress_lit.evaluation.ten_crop`).
``data=places205 data.root=...`` (or any ImageFolder tree with train/ and val/) gives the paper's Places column.
"""
from __future__ import annotations

import logging

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .evaluation.linear_run import run_linear
from .evaluation.settings import register_eval_configs
from .runtime.paths import config_dir
from .runtime.startup import entry_main, run_entry

log = logging.getLogger("compress_lit.linear")
CONF_DIR = config_dir()  # conf/ of the checkout, or compress_lit/conf of an installed wheel
register_eval_configs()


@entry_main("linear")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO)
    run_entry("linear", lambda: run_linear(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
