"""MoCo v2 pretraining of a backbone from its config to its checkpoint and results (``python -m
compress_lit.pretrain``): the demo teacher, or the "MoCo from scratch" rows."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ..data import build_datamodule
from ..evaluation.suite import evaluate_models, format_table
from ..methods import MoCoV2
from ..methods.build import build_student
from ..reporting.end_of_run import end_of_run
from ..runtime.config import validate_pretrain, warn_queue_vs_data
from ..runtime.distributed import apply_batch_plan
from ..runtime.fit import fit
from ..runtime.precision import apply_precision
from ..runtime.safety import atomic_copy, check_writable
from ..runtime.startup import check_accelerator, check_mandatory
from .run import build_run, start_run

log = logging.getLogger("compress_lit.pretrain")


def run_pretrain(cfg: DictConfig, run_dir: str | Path) -> dict:
    check_mandatory(cfg)
    validate_pretrain(cfg)
    check_accelerator(cfg.trainer)
    apply_precision(cfg.trainer)  # trainer.precision=auto resolved, logged and recorded in the run's config
    resume = start_run(cfg, run_dir)  # one run per folder; resume=auto: continues in the earlier run's directory
    run_dir = resume.run_dir
    if cfg.output:
        check_writable(Path(cfg.output).parent, "the output folder", cfg.safety.min_free_gb)
    pl.seed_everything(cfg.seed, workers=True)
    logger, history, trainer = build_run(cfg, run_dir, resume.history)  # an uneven global batch fails here
    dm = build_datamodule(cfg.data, views=2)
    dm.setup("fit")
    warn_queue_vs_data(cfg, dm.num_train)
    backbone = build_student(cfg.student)
    m = cfg.method
    module = MoCoV2(backbone, cfg.optim, queue_size=m.queue_size, temperature=m.temperature, momentum=m.momentum,
                    proj_hidden_dim=m.proj_hidden_dim, proj_dim=m.proj_dim, shuffle_bn=m.shuffle_bn,
                    bn_splits=m.bn_splits,
                    config=OmegaConf.to_container(cfg, resolve=True))
    apply_batch_plan(cfg, trainer, module, logger)  # data.batch_size is global; the learning rate, stated
    fit(trainer, module, dm, resume.checkpoint, run_dir)  # weights-only resume; SIGTERM: checkpoint, exit 143
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.output and trainer.is_global_zero:
        atomic_copy(last, cfg.output)
        log.info("pretrained checkpoint written to %s", cfg.output)
    results = {}
    if cfg.eval.at_end and trainer.is_global_zero:
        results = evaluate_models({f"{cfg.student.name} (MoCo v2)": module.backbone}, dm, list(cfg.eval.knn_k),
                                  module.device, cfg.eval.cluster_seeds, cfg.eval.linear)
        print(f"\nTop-1 (%) on the held-out {cfg.data.name} split\n{format_table(results, cfg.eval.cluster_seeds)}\n",
              flush=True)
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    if trainer.is_global_zero:  # learning curves, results to the logger (W&B: summary, table, images)
        end_of_run(logger, run_dir, results, history.rows,
                   title=f"MoCo v2 pretraining of {cfg.student.name} on {cfg.data.name}")
    return results


__all__ = ["run_pretrain"]
