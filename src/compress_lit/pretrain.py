"""`python -m compress_lit.pretrain`: MoCo v2 pretraining of a backbone (the demo teacher, or MoCo-from-scratch).

The final checkpoint is a Lightning checkpoint with the backbone under ``backbone.``; the teacher loader reads
it with ``teacher.format=compress_lit``. ``output=<path>`` also copies it there (atomically).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import register_configs, validate_pretrain
from .data import build_datamodule
from .loggers import build_logger
from .methods import MoCoV2
from .resume import resolve_resume
from .reporting import HistoryCallback, end_of_run, hydra_run_identity
from .safety import atomic_copy, check_writable
from .evaluation.suite import evaluate_models, format_table
from .train import CONF_DIR, USER_ERRORS, build_student, build_trainer, quiet_known_noise

log = logging.getLogger("compress_lit.pretrain")
register_configs()


def run_pretrain(cfg: DictConfig, run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    validate_pretrain(cfg)
    check_writable(run_dir, "the run directory", cfg.safety.min_free_gb)
    if cfg.output:
        check_writable(Path(cfg.output).parent, "the output folder", cfg.safety.min_free_gb)
    pl.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg.data, views=2)
    dm.setup("fit")
    backbone = build_student(cfg.student)
    m = cfg.method
    module = MoCoV2(backbone, cfg.optim, queue_size=m.queue_size, temperature=m.temperature, momentum=m.momentum,
                    proj_hidden_dim=m.proj_hidden_dim, proj_dim=m.proj_dim, bn_splits=m.bn_splits,
                    config=OmegaConf.to_container(cfg, resolve=True))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    group, job_name = hydra_run_identity()  # multirun: W&B group = the sweep, run name = the job's overrides
    logger = build_logger(cfg.logger, run_dir, cfg.run_name or job_name, resolved, group=group)
    history = HistoryCallback()
    trainer = build_trainer(cfg, run_dir, logger, callbacks=[history])
    trainer.fit(module, datamodule=dm, ckpt_path=resolve_resume(cfg.resume, run_dir), weights_only=False)
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


@hydra.main(config_path=CONF_DIR, config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_known_noise()
    try:
        run_pretrain(cfg, HydraConfig.get().runtime.output_dir)
    except USER_ERRORS as e:
        sys.exit(f"compress_lit.pretrain: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
