"""Which LightningModule a training config builds: ``method.name`` -> its constructor (``METHOD_BUILDERS``), the
student network of ``student.*`` and the views per image a method needs (``METHOD_VIEWS``). A new method: its
module in this package and one line in ``METHOD_BUILDERS``."""
from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from ..models import build_from_config
from ..runtime.config import ConfigError
from .baselines import CRD, ClusterClassification, Regression, Supervised
from .compress import CompReSS
from .disco import DisCo
from .distill import DistillationModule
from .seed import SEED
from .simreg import SimReg


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


__all__ = ["METHOD_BUILDERS", "METHOD_VIEWS", "build_method", "build_student"]
