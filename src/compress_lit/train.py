"""`python -m compress_lit.train`: compress a frozen teacher into a student (Hydra + Lightning).

With no arguments it runs the embedded default: digits data, the project's own MoCo v2 demo teacher (pretrained
first if its checkpoint is not in the cache), a small ResNet-18 student, CompReSS-2q. The paper's setting is
``python -m compress_lit.train teacher=resnet50x4 student=alexnet data=imagenet data.root=/path``.
"""
from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, register_configs, validate_train
from .data import DatasetError, build_datamodule
from .evaluation.suite import evaluate_models, format_table
from .loggers import build_logger
from .methods import CompReSS
from .models import build_backbone
from .resume import resolve_resume
from .safety import AtomicCheckpointIO, StartupError, check_writable
from .teacher import TeacherLoadError, build_teacher

log = logging.getLogger("compress_lit.train")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()
# errors whose message is written for the user: shown without a traceback by the entry points
USER_ERRORS = (ConfigError, DatasetError, TeacherLoadError, StartupError)


def quiet_known_noise() -> None:
    # the frozen teacher is in eval mode on purpose (Lightning warns about any eval-mode module at fit start)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer`.*")  # ours, on purpose
    warnings.filterwarnings("ignore", message=r".*no `validation_step`.*")  # val data is for the evaluations
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def build_student(scfg, num_classes: int | None = None) -> torch.nn.Module:
    kw = {}
    if scfg.fc_dim is not None:
        kw["fc_dim"] = scfg.fc_dim
    if num_classes:
        kw["num_classes"] = num_classes
    return build_backbone(scfg.arch, small_input=scfg.small_input, width_multiplier=scfg.width_multiplier, **kw)


def build_method(cfg: DictConfig, student, teacher) -> CompReSS:
    m = cfg.method
    return CompReSS(student, teacher, cfg.optim, queue_size=m.queue_size, temperature=m.temperature,
                    student_temperature=m.student_temperature, momentum=m.momentum,
                    use_momentum_encoder=m.use_momentum_encoder, one_queue=m.one_queue,
                    queue_dtype=m.queue_dtype, config=OmegaConf.to_container(cfg, resolve=True))


def ensure_teacher_checkpoint(tcfg) -> None:
    """Build the demo teacher with the pretraining entry point when its checkpoint is not there yet."""
    path = Path(tcfg.checkpoint)
    if path.exists() or not tcfg.pretrain_if_missing:
        return
    cmd = [sys.executable, "-m", "compress_lit.pretrain", *tcfg.pretrain_args, f"output={path}"]
    print(f"[compress_lit] teacher checkpoint {path} not found: pretraining it first with\n  {' '.join(cmd)}",
          flush=True)
    subprocess.run(cmd, check=True)
    if not path.exists():
        raise RuntimeError(f"pretraining finished but wrote no checkpoint at {path}")
    print(f"[compress_lit] teacher ready: {path} (reused on later runs)", flush=True)


def eval_callbacks(ecfg) -> list[pl.Callback]:
    """k-NN and cluster alignment during training, every ``eval.every_n_epochs`` epochs (0: none)."""
    if not ecfg.every_n_epochs:
        return []
    from .evaluation.callbacks import ClusterAlignmentCallback, KNNCallback

    kw = dict(every_n_epochs=ecfg.every_n_epochs, train_subset=ecfg.train_subset, val_subset=ecfg.val_subset)
    return [KNNCallback(ks=list(ecfg.knn_k), **kw), ClusterAlignmentCallback(seeds=1, **kw)]


def build_trainer(cfg: DictConfig, run_dir: Path, logger, callbacks=()) -> pl.Trainer:
    from pytorch_lightning.callbacks import ModelCheckpoint

    callbacks = [*callbacks, *eval_callbacks(cfg.eval)]
    # Every epoch: the newest checkpoint (top-1 without a monitor = the latest) and `last.ckpt` linking to it.
    # save_on_train_epoch_end: there is no validation loop (the val split serves the evaluations), so the
    # default "save after validation" would never save during training.
    ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last="link", save_top_k=1, every_n_epochs=1,
                           save_on_train_epoch_end=True)
    kwargs = dict(OmegaConf.to_container(cfg.trainer, resolve=True))
    kwargs.setdefault("max_epochs", cfg.optim.epochs)
    try:
        return pl.Trainer(default_root_dir=str(run_dir), logger=logger, callbacks=[ckpt, *callbacks],
                          plugins=[AtomicCheckpointIO()], **kwargs)
    except TypeError as e:  # an unknown trainer.* key
        raise ValueError(f"invalid trainer.* setting: {e}") from e


def run_train(cfg: DictConfig, run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    validate_train(cfg)
    check_writable(run_dir, "the run directory", cfg.safety.min_free_gb)
    if cfg.teacher.pretrain_if_missing:
        check_writable(cfg.cache_dir, "the cache directory (cache_dir)", cfg.safety.min_free_gb)
    pl.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    if cfg.teacher.checkpoint:
        ensure_teacher_checkpoint(cfg.teacher)
    teacher = build_teacher(cfg.teacher)
    student = build_student(cfg.student)
    init_student = copy.deepcopy(student) if (cfg.eval.at_end and cfg.eval.random_baseline) else None
    module = build_method(cfg, student, teacher)
    if cfg.perf.channels_last:
        module.use_channels_last()
    if cfg.perf.compile:
        module.student.compile()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = build_logger(cfg.logger, run_dir, cfg.run_name, resolved)
    trainer = build_trainer(cfg, run_dir, logger)
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    # our own checkpoints hold RNG states (numpy arrays) besides tensors: trusted, so not weights-only
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=False)
    teacher.assert_frozen()

    results: dict = {}
    if cfg.eval.at_end and trainer.is_global_zero:
        device = module.device
        models = {f"teacher ({cfg.teacher.name})": teacher} if cfg.eval.include_teacher else {}
        models[f"student ({cfg.method.name})"] = module.student
        if init_student is not None:
            models["student, random init"] = init_student.to(device)
        results = evaluate_models(models, dm, list(cfg.eval.knn_k), device, cfg.eval.cluster_seeds,
                                  cfg.eval.linear, run_dir if cfg.eval.save_features else None)
        print(f"\nTop-1 (%) on the held-out {cfg.data.name} split ({dm.num_val} images; k-NN bank, k-means and "
              f"linear probe on the {dm.num_train} train images)\n{format_table(results, cfg.eval.cluster_seeds)}\n",
              flush=True)
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        if logger:
            trainer.logger.log_metrics({f"eval/{m}/{k}": v for m, row in results.items() for k, v in row.items()})
    return results


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_known_noise()
    try:
        run_train(cfg, HydraConfig.get().runtime.output_dir)
    except USER_ERRORS as e:
        sys.exit(f"compress_lit.train: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
