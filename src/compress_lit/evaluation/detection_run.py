"""What ``python -m compress_lit.detect`` runs: the checks of its inputs, the VOC07 detection transfer of a
backbone (Faster R-CNN fine-tuned on trainval, scored on test), the results and detections written to the run
folder."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ..runtime.config import ConfigError
from ..runtime.precision import apply_precision
from ..runtime.startup import check_accelerator, check_file, check_mandatory
from .settings import MODEL_FORMATS

HINTS = {"detect.root": "detect.root=<folder holding VOCdevkit/VOC2007>"}


def _check(cfg: DictConfig) -> None:
    """Start-up checks, before the model or any image is read: ConfigErrors naming the key."""
    from .voc import VOCError, find_voc2007

    check_mandatory(cfg, HINTS)
    if cfg.model_format not in MODEL_FORMATS:
        raise ConfigError(f"model_format={cfg.model_format!r} is invalid: choose one of {list(MODEL_FORMATS)}")
    d = cfg.detect
    if d.ap not in ("11point", "area"):
        raise ConfigError(f"detect.ap={d.ap!r} is invalid: choose 11point (VOC07) or area")
    for key in ("batch_size", "eval_batch_size", "epochs", "min_size", "max_size"):
        if int(d[key]) < 1:
            raise ConfigError(f"detect.{key}={d[key]} must be at least 1")
    if not 0 < d.iou_threshold < 1:
        raise ConfigError(f"detect.iou_threshold={d.iou_threshold} must be between 0 and 1")
    try:
        find_voc2007(d.root)
    except VOCError as e:
        raise ConfigError(f"detect.root={d.root}: {e}") from None
    if cfg.model_format != "random" or cfg.checkpoint:
        check_file("checkpoint", cfg.checkpoint, "checkpoint file")
    check_accelerator(cfg.trainer)


def results_markdown(res: dict[str, Any], header: str = "") -> str:
    """The per-class AP table (classes without ground truth in the test split: "–"), mAP last."""
    kind = "11-point" if res["ap_kind"] == "11point" else "area"
    rows = [(name, "–" if ap is None else f"{ap:.2f}") for name, ap in res["per_class"].items()]
    rows.append(("**mAP**", f"**{res['mAP']:.2f}**"))
    first = f"AP{int(round(100 * res['iou_threshold']))} ({kind}, %)"
    w0 = max(len("class"), *(len(r[0]) for r in rows))
    w1 = max(len(first), *(len(r[1]) for r in rows))
    lines = [header] if header else []
    lines += [f"| {'class':<{w0}} | {first:>{w1}} |", f"|{'-' * (w0 + 2)}|{'-' * (w1 + 1)}:|"]
    lines += [f"| {a:<{w0}} | {b:>{w1}} |" for a, b in rows]
    lines.append(f"\nAP at IoU > {res['iou_threshold']}, VOC07 {res['test_split']} "
                 f"({res['num_test']} images), after fine-tuning on {res['train_split']} ({res['num_train']} images)")
    return "\n".join(lines)


def save_detections(path: Path, detections: dict[int, dict]) -> None:
    """Every scored detection as flat arrays: ``image`` (test index), ``label`` (1-based), ``score``, ``box``."""
    items = sorted(detections.items())
    image = np.concatenate([np.full(len(d["scores"]), i, np.int64) for i, d in items]) if items else np.zeros(0)
    label = np.concatenate([np.asarray(d["labels"], np.int64) for _, d in items]) if items else np.zeros(0)
    score = np.concatenate([np.asarray(d["scores"], np.float32) for _, d in items]) if items else np.zeros(0)
    box = (np.concatenate([np.asarray(d["boxes"], np.float32).reshape(-1, 4) for _, d in items]) if items
           else np.zeros((0, 4)))
    np.savez(path, image=image, label=label, score=score, box=box)


def run_detect(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Fine-tune the student of ``cfg`` on VOC07 trainval, score VOC07 test; write the outputs to ``out_dir``."""
    from .detector import DetectionModule, VOCDetectionData, build_detector
    from .loading import load_model, resolve_data_config
    from .voc_detection import voc07_detection_ap

    _check(cfg)
    apply_precision(cfg.trainer)  # trainer.precision=auto, as every entry point that builds a Trainer
    pl.seed_everything(cfg.seed, workers=True)
    settings = OmegaConf.to_object(cfg.detect)
    loaded = load_model(cfg.checkpoint, cfg.model_format, cfg.model)
    data_cfg = resolve_data_config(loaded.data, cfg.data)  # the student's normalisation
    detector = build_detector(loaded.model, loaded.arch, settings, data_cfg.mean, data_cfg.std)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dm = VOCDetectionData(settings)
    dm.setup()
    module = DetectionModule(detector, settings)
    kwargs = {"max_epochs": int(settings.epochs), "logger": False, "enable_checkpointing": False,
              "enable_progress_bar": bool(cfg.progress), "enable_model_summary": False,
              "num_sanity_val_steps": 0, "default_root_dir": str(out_dir)}
    kwargs.update(OmegaConf.to_container(cfg.trainer, resolve=True))
    trainer = pl.Trainer(**kwargs)
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    annotations = {i: dm.test.annotation(i) for i in range(len(dm.test))}
    res = voc07_detection_ap(module.detections, annotations, kind=settings.ap, iou_threshold=settings.iou_threshold)
    losses = module.loss_history
    res.update({"checkpoint": str(cfg.checkpoint), "arch": loaded.arch, "train_split": settings.train_split,
                "test_split": settings.test_split, "num_train": len(dm.train), "num_test": len(dm.test),
                "images_scored": len(module.detections), "processes": int(trainer.world_size),
                "epochs": int(settings.epochs), "steps": len(losses), "loss_history": losses,
                "detector": "torchvision Faster R-CNN (RPN proposals), all layers fine-tuned",
                "settings": OmegaConf.to_container(cfg.detect, resolve=True)})
    if trainer.is_global_zero:
        header = f"## VOC07 detection: {loaded.name} ({loaded.arch}) fine-tuned in Faster R-CNN\n"
        table = results_markdown(res, header)
        save_detections(out_dir / "detections.npz", module.detections)
        (out_dir / "results.json").write_text(json.dumps(res, indent=2, default=_json_default))
        (out_dir / "results.md").write_text(table + "\n")
        print("\n" + table + "\n", flush=True)
    return res


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if math.isnan(float(o)) else float(o)
    return str(o)
