"""`python -m compress_lit.train`: compress a frozen teacher into a student (Hydra + Lightning).

With no arguments it runs the embedded default: digits data, the project's own MoCo v2 demo teacher (pretrained
first if its checkpoint is not in the cache), a small ResNet-18 student, CompReSS-2q. The paper's setting is
``python -m compress_lit.train teacher=resnet50x4 student=alexnet data=imagenet data.root=/path``.

``teacher.cached=true``: no teacher network is built; the teacher's features are looked up by dataset index in a
cache made beforehand by ``python -m compress_lit.cache_features <the same overrides>`` (the centre-crop embedding
of every training image, as the paper did for R50x4; ``teacher.cache_views=K``: K seeded augmented views, the
student then sees exactly one of them). See :mod:`compress_lit.teachers.cache`.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .runtime.config import ConfigError, register_configs, validate_train, warn_queue_vs_data, warn_unused_settings
from .data import build_datamodule
from .runtime.distributed import apply_batch_plan, ddp_strategy, is_ddp_name, plan_batch
from .evaluation.suite import evaluate_models, format_table
from .runtime.loggers import build_logger
from .methods import CompReSS, DistillationModule
from .methods.baselines import CRD, ClusterClassification, Regression, Supervised
from .methods.disco import DisCo
from .methods.seed import SEED
from .methods.simreg import SimReg
from .models import build_from_config
from .runtime.nonfinite import WeightWatch
from .runtime.paths import config_dir
from .runtime.precision import AUTO, apply_precision, resolved_precision
from .reporting.end_of_run import HistoryCallback, end_of_run, hydra_run_identity, rich_progress_bar
from .runtime.resume import prepare_resume
from .runtime import run_folder
from .runtime.fit import SaveOnSigterm, fit
from .runtime.safety import AtomicCheckpointIO, StartupError, check_writable
from .runtime.startup import (MANDATORY_HINTS, QUIET_INTERRUPT, USER_ERRORS, check_accelerator, entry_main,
                      quiet_known_noise, run_entry, set_output_dir)
from .teachers import build_teacher
from .teachers.cache import (CacheMissingError, SeededViews, TeacherCacheError, cache_features_command, cache_path,
                             cache_views, expected_meta, open_cache, validate_cache_config)

log = logging.getLogger("compress_lit.train")
CONF_DIR = config_dir()  # conf/ of the checkout, or compress_lit/conf of an installed wheel
register_configs()
__all__ = ["USER_ERRORS", "quiet_known_noise", "run_train", "check_train_startup"]  # USER_ERRORS: see startup.py


def build_student(scfg, num_classes: int | None = None) -> torch.nn.Module:
    """``student.arch`` with the node's options (small_input, width_multiplier, AlexNet fc_dim / dropout, vit.*)."""
    return build_from_config(scfg, **({"num_classes": num_classes} if num_classes else {}))


def _compress(cfg, student, teacher, dm, config):
    m = cfg.method
    return CompReSS(student, teacher, cfg.optim, queue_size=m.queue_size, temperature=m.temperature,
                    student_temperature=m.student_temperature, momentum=m.momentum,
                    use_momentum_encoder=m.use_momentum_encoder, one_queue=m.one_queue,
                    queue_dtype=m.queue_dtype, config=config, train_head_dim=cfg.student.train_head_dim)


def _need_dm(dm, method: str):
    if dm is None:
        raise ValueError(f"method={method} needs the datamodule (number of training samples / classes)")
    return dm


def _regression(cfg, student, teacher, dm, config):
    return Regression(student, teacher, cfg.optim, bn=cfg.method.name == "regression_bn", config=config,
                      train_head_dim=cfg.student.train_head_dim)


def _crd(cfg, student, teacher, dm, config):
    m = cfg.method
    return CRD(student, teacher, cfg.optim, num_samples=_need_dm(dm, m.name).num_train, dim=m.crd_dim,
               num_negatives=m.crd_negatives, temperature=m.crd_temperature,
               memory_momentum=m.crd_memory_momentum, config=config, train_head_dim=cfg.student.train_head_dim)


def _cc(cfg, student, teacher, dm, config):
    m, dm = cfg.method, _need_dm(dm, cfg.method.name)
    k = m.cc_clusters if m.cc_clusters is not None else min(10 * dm.num_classes, dm.num_train)
    return ClusterClassification(student, teacher, cfg.optim, num_samples=dm.num_train, num_clusters=k,
                                 kmeans_iters=m.cc_kmeans_iters, kmeans_seed=cfg.seed, config=config,
                                 train_head_dim=cfg.student.train_head_dim)


def _supervised(cfg, student, teacher, dm, config):
    return Supervised(student, teacher, cfg.optim, num_classes=_need_dm(dm, cfg.method.name).num_classes,
                      config=config, train_head_dim=cfg.student.train_head_dim)


def _seed(cfg, student, teacher, dm, config):
    m = cfg.method  # method.temperature: the teacher's; method.student_temperature (null: the same): the student's
    return SEED(student, teacher, cfg.optim, queue_size=m.queue_size, teacher_temperature=m.temperature,
                student_temperature=m.student_temperature or m.temperature, hidden_dim=m.seed_hidden_dim,
                queue_dtype=m.queue_dtype, config=config, train_head_dim=cfg.student.train_head_dim)


def _simreg(cfg, student, teacher, dm, config):
    return SimReg(student, teacher, cfg.optim, head_depth=cfg.method.simreg_head_depth, config=config,
                  train_head_dim=cfg.student.train_head_dim)


def _disco(cfg, student, teacher, dm, config):
    m = cfg.method
    return DisCo(student, teacher, cfg.optim, queue_size=m.queue_size, temperature=m.temperature,
                 momentum=m.momentum, weight=m.disco_weight, hidden_dim=m.disco_hidden_dim,
                 bn_splits=m.disco_bn_splits, teacher_bn=m.disco_teacher_bn, queue_dtype=m.queue_dtype, config=config,
                 train_head_dim=cfg.student.train_head_dim)


# method.name -> constructor(cfg, student, teacher, datamodule, resolved config)
METHOD_BUILDERS = {
    "compress_2q": _compress, "compress_2q_nomomentum": _compress, "compress_1q": _compress,
    "regression": _regression, "regression_bn": _regression, "crd": _crd, "cc": _cc, "supervised": _supervised,
    "seed": _seed, "simreg": _simreg, "disco": _disco,
}
# augmented views per training image, for the methods that need more than one (the datamodule's MultiView)
METHOD_VIEWS = {"disco": DisCo.train_views}


def build_method(cfg: DictConfig, student, teacher, dm=None) -> DistillationModule:
    """The LightningModule of ``cfg.method.name``; ``dm`` (the datamodule) gives the baselines that need them
    the number of training samples (CRD's memories, CC's cluster ids) and of classes (Supervised, CC's k)."""
    try:
        builder = METHOD_BUILDERS[cfg.method.name]
    except KeyError:
        raise ConfigError(f"method.name={cfg.method.name!r} is invalid: choose one of {list(METHOD_BUILDERS)}") \
            from None
    return builder(cfg, student, teacher, dm, OmegaConf.to_container(cfg, resolve=True))


def ensure_teacher_checkpoint(tcfg, trainer_cfg=None) -> None:
    """Build the demo teacher with the pretraining entry point when its checkpoint is not there yet. The
    pretraining runs with ``resume=auto``: after a Ctrl-C or a kill, the next run continues it from its last epoch
    checkpoint; ``trainer.enable_progress_bar`` (of ``trainer_cfg``) reaches it."""
    path = Path(tcfg.checkpoint)
    if path.exists() or not tcfg.pretrain_if_missing:
        return
    bar = [] if trainer_cfg is None else [f"trainer.enable_progress_bar={str(trainer_cfg.enable_progress_bar).lower()}"]
    cmd = [sys.executable, "-m", "compress_lit.pretrain", *tcfg.pretrain_args, *bar, "resume=auto", f"output={path}"]
    print(f"[compress_lit] teacher checkpoint {path} not found: pretraining it first with\n  {' '.join(cmd)}",
          flush=True)
    stopped = KeyboardInterrupt(f"the teacher's pretraining stopped; the same command continues it from its last "
                                f"epoch ({' '.join(cmd[1:3])} resume=auto)")
    proc = subprocess.Popen(cmd, env={**os.environ, QUIET_INTERRUPT: "train"})
    try:
        returncode = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached both: let the pretraining end its step and close its files
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise stopped from None
    if returncode == 130:
        raise stopped
    if returncode != 0:
        raise StartupError(f"pretraining the teacher for teacher.checkpoint={path} failed (exit status "
                           f"{returncode}; its message is above)")
    if not path.exists():
        raise RuntimeError(f"pretraining finished but wrote no checkpoint at {path}")
    print(f"[compress_lit] teacher ready: {path} (reused on later runs)", flush=True)


def _run_overrides() -> list[str] | None:
    """This run's command-line overrides (None outside a Hydra run)."""
    if not HydraConfig.initialized():
        return None
    return [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.")]


def cached_teacher(cfg: DictConfig, dm) -> torch.nn.Module:
    """``teacher.cached=true``: the teacher's features from the cache (teachers/cache.py) instead of the network.

    The cache must have been built for this teacher (identity: name, arch, format, checkpoint path, size, mtime
    and the SHA-256 of the tensors in the file, so a swapped file is caught), exactly this train split (the fingerprint of
    its resolved samples, besides name, size, image size, normalisation) and transform (centre crop, or
    ``teacher.cache_views`` seeded views; then the training set is wrapped in ``SeededViews``). A missing cache
    is built in-process when ``teacher.build_cache_if_missing=true``; otherwise the error gives the command."""
    validate_cache_config(cfg)
    if cfg.method.name == "cc":
        raise ConfigError("method=cc clusters the teacher's network outputs itself: it does not support "
                          "teacher.cached=true (it runs the teacher only once anyway)")
    path, views = cache_path(cfg), cache_views(cfg)
    if cfg.teacher.checkpoint and cfg.teacher.format != "random":
        ensure_teacher_checkpoint(cfg.teacher)
    samples = dm.train_dataset_eval.fingerprint()  # exactly the images of this run's train split

    def expected():  # the checkpoint's weights hash is part of the teacher's identity (a swapped file is caught)
        return expected_meta(cfg.teacher, cfg.data, dm.num_train, views, seed=cfg.seed, samples=samples,
                             precision=resolved_precision(cfg.trainer))

    try:
        teacher = open_cache(path, expected())
    except CacheMissingError as e:
        if not cfg.teacher.build_cache_if_missing:
            overrides = _run_overrides()
            cmd = cache_features_command(overrides) if overrides is not None else \
                "python -m compress_lit.cache_features <the same overrides as this run>"
            raise TeacherCacheError(f"{e}: build it first with\n  {cmd}\nor set teacher.build_cache_if_missing=true")
        from .cache_features import compute_for_config, local_device_and_autocast

        check_writable(path.parent, "the feature cache folder", cfg.safety.min_free_gb)
        print(f"[compress_lit] teacher feature cache {path} not found: computing it first", flush=True)
        device, autocast = local_device_and_autocast(cfg.trainer)
        rng = torch.random.get_rng_state()
        torch.manual_seed(cfg.seed)  # as compress_lit.cache_features (random-format teachers)
        compute_for_config(cfg, dm, device=device, autocast=autocast)
        torch.random.set_rng_state(rng)
        teacher = open_cache(path, expected())
    log.info("cached teacher %s: %s", cfg.teacher.name, teacher)
    if teacher.views > 1:
        dm.wrap_train(lambda ds: SeededViews(ds, teacher.views, teacher.base_seed))
    return teacher


def eval_callbacks(ecfg) -> list[pl.Callback]:
    """k-NN and cluster alignment during training, every ``eval.every_n_epochs`` epochs (0: none)."""
    if not ecfg.every_n_epochs:
        return []
    from .evaluation.callbacks import ClusterAlignmentCallback, KNNCallback

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


def check_train_startup(cfg: DictConfig) -> None:
    """Everything about ``cfg`` that can fail before any data is read or any network is built (also used by
    ``cache_features``): mandatory keys, values, the accelerator, the teacher's file."""
    try:
        validate_train(cfg)
        invalid = None
    except ConfigError as e:
        invalid = e
    check_missing_pieces(cfg, invalid)
    check_accelerator(cfg.trainer)


def check_missing_pieces(cfg: DictConfig, invalid: ConfigError | None = None) -> None:
    """Every piece the command still lacks, in one ``ConfigError``: the keys left at ``???``, the teacher's file
    (named or not there), the data folder (not there), each with where it comes from, and one complete example
    command (the command line's own arguments plus the missing ones); ``invalid``, the value check's error, is
    reported with them (or alone)."""
    t = cfg.teacher
    pieces: list[str] = []
    missing = set(OmegaConf.missing_keys(cfg))
    needs_file = t.format != "random" and not t.pretrain_if_missing
    fill = {}
    if "teacher.checkpoint" in missing or (needs_file and not t.checkpoint):
        missing.discard("teacher.checkpoint")
        pieces.append(f"teacher.checkpoint (the {t.name} teacher's file, teacher.format={t.format}; docs/teachers.md "
                      f"says where each teacher is downloaded)")
        fill["teacher.checkpoint"] = f"/path/to/{t.name}.pth"
    elif needs_file:
        p = Path(os.path.expanduser(str(t.checkpoint)))
        if not p.is_file():
            what = "is a folder, not a teacher checkpoint file" if p.is_dir() else "no such teacher checkpoint file"
            pieces.append(f"teacher.checkpoint={t.checkpoint}: {what} (docs/teachers.md says where each teacher is "
                          f"downloaded)")
    if "data.root" in missing or (cfg.data.name == "imagefolder" and not cfg.data.root):
        missing.discard("data.root")
        pieces.append("data.root (a folder holding train/<class>/ and val/<class>/ images)")
        fill["data.root"] = "/path/to/imagenet"
    elif cfg.data.name == "imagefolder" and cfg.data.root and not Path(os.path.expanduser(str(cfg.data.root))).is_dir():
        pieces.append(f"data.root={cfg.data.root}: no such folder (it must hold train/<class>/ and val/<class>/)")
    for key in sorted(missing):
        hint = MANDATORY_HINTS.get(key, f"{key}=<value>")
        pieces.append(f"{key} ({hint})")
        fill[key] = hint.split("=", 1)[1] if "=" in hint else "<value>"
    if invalid is not None and not (pieces and "teacher.checkpoint is required" in str(invalid)):
        if not pieces:
            raise invalid
        pieces.append(str(invalid))
    if not pieces:
        return
    if fill and not t.small_input and cfg.data.name != "imagefolder":  # an ImageNet teacher on the embedded data
        pieces.append(f"the data (data={cfg.data.name} is the embedded demo data; the {t.name} teacher is an "
                      f"ImageNet network: the paper's setting is data=imagenet data.root=<folder>)")
        fill.update({"data": "imagenet", "data.root": "/path/to/imagenet"})
    if not fill:  # files that are not there, values to fix: the plain messages
        if len(pieces) == 1:
            raise ConfigError(pieces[0].split(" (docs/")[0])
        raise ConfigError(f"{len(pieces)} problems: " + "; ".join(pieces))
    args = [a for a in (_run_overrides() or []) if a.split("=", 1)[0] not in fill]
    example = " ".join(["python -m compress_lit.train", *args, *(f"{k}={v}" for k, v in fill.items())])
    raise ConfigError(f"{len(pieces)} missing: " + "; ".join(pieces) + f". A complete command: {example}")


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
            from .data.transforms import TENSOR_DATASETS
            from .evaluation.pixels import RawPixels

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


@entry_main("train")
def main(cfg: DictConfig) -> None:
    run_entry("train", lambda: run_train(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
