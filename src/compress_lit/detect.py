"""`python -m compress_lit.detect checkpoint=... detect.root=...`: VOC07 detection transfer of a student (Hydra).

The student (loaded as ``compress_lit.evaluate`` loads it: ``model_format=``, ``model.*``) is fine-tuned, all
layers, as the backbone of torchvision's Faster R-CNN on VOC07 ``trainval`` and scored on VOC07 ``test`` with the
VOC07 metric, AP at IoU > 0.5 with 11-point interpolation, per class and their mean
(:mod:`compress_lit.evaluation.detector`, :mod:`compress_lit.evaluation.voc_detection`). ``detect.*`` holds the
settings (Fast R-CNN's VOC07 solver by default); ``trainer.*`` goes to Lightning (``trainer.devices=4
trainer.strategy=ddp``: ``detect.batch_size`` is the global batch).

Writes ``results.json`` (per-class AP, mAP, the loss of every step), ``results.md`` (the per-class table) and
``detections.npz`` (``image``, ``label``, ``score``, ``box``: every detection that was scored, test-set index and
1-based class, boxes ``x1, y1, x2, y2`` in the continuous pixel frame) to the run directory, and prints the table.
"""
from __future__ import annotations

import logging

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .evaluation.detection_run import run_detect
from .evaluation.settings import register_eval_configs
from .runtime.paths import config_dir
from .runtime.startup import entry_main, quiet_known_noise, run_entry

log = logging.getLogger("compress_lit.detect")
CONF_DIR = config_dir()  # conf/ of the checkout, or compress_lit/conf of an installed wheel
register_eval_configs()


@entry_main("detect")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO)
    quiet_known_noise()
    run_entry("detect", lambda: run_detect(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
