"""A training run from its config to its results (``python -m compress_lit.train``), and the pieces the
pretraining shares: the run folder claimed and resume resolved (``start_run``), the logger, history callback and
Trainer (``build_run``, ``build_trainer``), the evaluation at the end."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ..data import build_datamodule
from ..evaluation.suite import evaluate_models, format_table
from ..methods.build import METHOD_VIEWS, build_method, build_student
from ..reporting.end_of_run import HistoryCallback, end_of_run, hydra_run_identity, rich_progress_bar
from ..runtime import run_folder
from ..runtime.config import warn_queue_vs_data, warn_unused_settings
from ..runtime.distributed import apply_batch_plan, ddp_strategy, is_ddp_name, plan_batch
from ..runtime.fit import SaveOnSigterm, fit
from ..runtime.loggers import build_logger
from ..runtime.nonfinite import WeightWatch
from ..runtime.precision import AUTO, apply_precision, resolved_precision
from ..runtime.resume import prepare_resume
from ..runtime.safety import AtomicCheckpointIO, check_writable
from ..runtime.startup import check_accelerator, set_output_dir
from ..teachers import build_teacher
from .checks import check_train_startup
from .teacher import cached_teacher, ensure_teacher_checkpoint

log = logging.getLogger("compress_lit.train")


def eval_callbacks(ecfg) -> list[pl.Callback]:
    """k-NN and cluster alignment during training, every ``eval.every_n_epochs`` epochs (0: none)."""
    if not ecfg.every_n_epochs:
        return []
    from ..evaluation.callbacks import ClusterAlignmentCallback, KNNCallback

    kw = dict(every_n_epochs=ecfg.every_n_epochs, train_subset=ecfg.train_subset, val_subset=ecfg.val_subset)
    return [KNNCallback(ks=list(ecfg.knn_k), **kw), ClusterAlignmentCallback(seeds=1, **kw)]


def build_trainer(cfg: DictConfig, run_dir: Path, logger, callbacks=()) -> pl.Trainer:
    from pytorch_lightning.callbacks import ModelCheckpoint

    check_accelerator(cfg.trainer)  # a ConfigError naming trainer.accelerator, not Lightning's traceback
    callbacks = [*callbacks, *eval_callbacks(cfg.eval)]
    # Every epoch: the newest checkpoint (top-1 without a monitor = the latest) and `last.ckpt` linking to it.
    # save_on_train_epoch_end: there is no validation loop (the val split serves the evaluations), so the
    # default "save after validation" would never save during training.
    # named epoch<E>-step<S>.ckpt: no '=' (Hydra reads '=' in an unquoted value as syntax, so Lightning's default
    # epoch=<E>-step=<S>.ckpt could not be passed as resume= or teacher.checkpoint= without quoting)
    ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="epoch{epoch}-step{step}",
                           auto_insert_metric_name=False, save_last="link", save_top_k=1, every_n_epochs=1,
                           save_on_train_epoch_end=True)
    kwargs = dict(OmegaConf.to_container(cfg.trainer, resolve=True))
    if kwargs.get("precision") == AUTO:  # Lightning does not know `auto` (entry points resolve it: precision.py)
        kwargs["precision"] = resolved_precision(kwargs)
    kwargs.setdefault("max_epochs", cfg.optim.epochs)
    if is_ddp_name(kwargs.get("strategy")):  # no per-step re-broadcast of the queues (distributed.py)
        kwargs["strategy"] = ddp_strategy(kwargs["strategy"])
    bar = rich_progress_bar() if kwargs.get("enable_progress_bar", True) else None  # None: Lightning's default
    callbacks += [bar] if bar is not None else []
    callbacks.append(SaveOnSigterm(run_dir))  # SIGTERM: a resumable checkpoint, then exit 143 (runtime/fit.py)
    callbacks.append(WeightWatch())  # non-finite parameters/buffers: stop at the step, never checkpoint them
    try:
        return pl.Trainer(default_root_dir=str(run_dir), logger=logger, callbacks=[ckpt, *callbacks],
                          plugins=[AtomicCheckpointIO()], **kwargs)
    except TypeError as e:  # an unknown trainer.* key
        raise ValueError(f"invalid trainer.* setting: {e}") from e


def build_run(cfg: DictConfig, run_dir: Path, history_rows=None):
    """The logger, the history callback and the Trainer of a run (train and pretrain). An uneven split of the
    global batch over the Trainer's processes fails here, before any data is read."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    group, job_name = hydra_run_identity()  # multirun: W&B group = the sweep, run name = the job's overrides
    logger = build_logger(cfg.logger, run_dir, cfg.run_name or job_name, resolved, group=group,
                          history=history_rows)
    history = HistoryCallback()
    trainer = build_trainer(cfg, run_dir, logger, callbacks=[history])
    plan_batch(cfg, trainer.world_size)
    return logger, history, trainer


def start_run(cfg: DictConfig, run_dir: str | Path):
    """What train and pretrain do before any data is read: claim the run folder (one run per folder), resolve
    ``resume`` (the checkpoint read weights-only, its config checked for ``resume=auto``), check the folders are
    writable. Returns the :class:`~compress_lit.runtime.resume.Resume`."""
    run_folder.claim(run_dir, resuming=bool(cfg.resume))
    resume = prepare_resume(cfg.resume, run_dir, OmegaConf.to_container(cfg, resolve=True))
    set_output_dir(resume.run_dir)
    check_writable(resume.run_dir, "the run directory", cfg.safety.min_free_gb)
    return resume


def run_train(cfg: DictConfig, run_dir: str | Path) -> dict:
    check_train_startup(cfg)
    apply_precision(cfg.trainer)  # trainer.precision=auto resolved, logged and recorded in the run's config
    warn_unused_settings(cfg)
    # resume=auto with an earlier run's checkpoint continues in that run's directory (resume.py)
    resume = start_run(cfg, run_dir)
    run_dir = resume.run_dir
    if cfg.teacher.pretrain_if_missing:
        check_writable(cfg.cache_dir, "the cache directory (cache_dir)", cfg.safety.min_free_gb)
    pl.seed_everything(cfg.seed, workers=True)
    logger, history, trainer = build_run(cfg, run_dir, resume.history)
    dm = build_datamodule(cfg.data, views=METHOD_VIEWS.get(cfg.method.name, 1),
                          channels_last=cfg.perf.channels_last)
    dm.setup("fit")
    warn_queue_vs_data(cfg, dm.num_train)
    if cfg.teacher.cached:  # no teacher network: its features are looked up by dataset index
        teacher = cached_teacher(cfg, dm)
    else:
        if cfg.teacher.checkpoint:
            ensure_teacher_checkpoint(cfg.teacher, cfg.trainer)
        teacher = build_teacher(cfg.teacher)
    resume.check_teacher(teacher.fingerprint())  # another teacher: refused before anything is written
    student = build_student(cfg.student)
    init_student = copy.deepcopy(student) if (cfg.eval.at_end and cfg.eval.random_baseline) else None
    module = build_method(cfg, student, teacher, dm)
    if cfg.perf.channels_last:
        module.use_channels_last()
    if cfg.perf.compile:
        module.student.compile()
    apply_batch_plan(cfg, trainer, module, logger)  # global batch split over the processes; the learning rate
    fit(trainer, module, dm, resume.checkpoint, run_dir)  # weights-only resume; SIGTERM: checkpoint, exit 143
    teacher.assert_frozen()

    results: dict = {}
    if cfg.eval.at_end and trainer.is_global_zero:
        device = module.device
        # a cached teacher has no network to evaluate (evaluate it from its checkpoint: compress_lit.evaluate)
        cached = getattr(teacher, "is_cached", False)
        if cached and cfg.eval.include_teacher:
            log.info("eval: the cached teacher has no network to evaluate; skipped")
        models = {f"teacher ({cfg.teacher.name})": teacher} if cfg.eval.include_teacher and not cached else {}
        models[f"student ({cfg.method.name})"] = module.student
        if init_student is not None:
            models["student, random init"] = init_student.to(device)
        if cfg.eval.pixel_baseline:
            from ..data.transforms import TENSOR_DATASETS
            from ..evaluation.pixels import RawPixels

            models["raw pixels"] = RawPixels(grey=cfg.data.name in TENSOR_DATASETS)
        results = evaluate_models(models, dm, list(cfg.eval.knn_k), device, cfg.eval.cluster_seeds,
                                  cfg.eval.linear, run_dir if cfg.eval.save_features else None)
        print(f"\nTop-1 (%) on the held-out {cfg.data.name} split ({dm.num_val} images; k-NN bank, k-means and "
              f"linear probe on the {len(dm.bank_dataset)} train images)\n"
              f"{format_table(results, cfg.eval.cluster_seeds)}\n", flush=True)
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    if trainer.is_global_zero:  # pictures, learning curves, results to the logger (W&B: summary, table, images)
        end_of_run(logger, run_dir, results, history.rows, pictures_of=module.student if results else None, dm=dm,
                   device=module.device, eval_cfg=cfg.eval, seed=cfg.seed,
                   title=f"student ({cfg.method.name}) of teacher {cfg.teacher.name} on {cfg.data.name}")
    return results


__all__ = ["build_run", "build_trainer", "eval_callbacks", "run_train", "start_run"]
