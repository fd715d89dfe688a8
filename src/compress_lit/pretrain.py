"""`python -m compress_lit.pretrain`: MoCo v2 pretraining of a backbone (the demo teacher, or MoCo-from-scratch).

The final checkpoint is a Lightning checkpoint with the backbone under ``backbone.``; the teacher loader reads
it with ``teacher.format=compress_lit``. ``output=<path>`` also copies it there (atomically).

MoCo v2 at ImageNet scale (the paper's teachers and its "MoCo from scratch" rows): ``pretrain_experiment=
paper/mocov2_imagenet student=<arch> data.root=...`` (lr 0.03 cosine, 200 epochs, batch 256, queue 65,536, m 0.999,
T 0.2, MLP head, MoCo v2's augmentation, shuffled BatchNorm: across processes under DDP, in split groups on one
device; see methods/moco.py).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .runtime.config import register_configs, validate_pretrain, warn_queue_vs_data
from .data import build_datamodule
from .methods import MoCoV2
from .runtime.precision import apply_precision
from .runtime.fit import fit
from .reporting.end_of_run import end_of_run
from .runtime.safety import atomic_copy, check_writable
from .evaluation.suite import evaluate_models, format_table
from .runtime.distributed import apply_batch_plan
from .runtime.startup import check_accelerator, check_mandatory, entry_main, run_entry
from .train import build_run, build_student, start_run

log = logging.getLogger("compress_lit.pretrain")
register_configs()


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


@entry_main("pretrain")
def main(cfg: DictConfig) -> None:
    run_entry("pretrain", lambda: run_pretrain(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
