"""Distributed training: the DDP strategy, and the rule that configured batch sizes are global.

* ``trainer.strategy=ddp`` (or any of Lightning's ``ddp*`` names) becomes a ``DDPStrategy`` with
  ``broadcast_buffers=False``. DDP's default re-broadcasts every buffer from rank 0 at every forward; our anchor
  queues (and CRD's memories) are buffers that every process already holds identically, because keys are gathered
  from all processes before they are enqueued, so the broadcast would move the whole queue each step (about 1.3 GB
  at the paper's MoCo R50 -> ResNet-18 sizes) for nothing. BatchNorm then behaves as in the official
  ``DataParallel`` code: each process normalises with its own sub-batch statistics, and the running statistics that
  are saved (rank 0's) come from rank 0's sub-batches. ``trainer.sync_batchnorm=true`` gives SyncBN instead.
* ``data.batch_size`` is the **global** batch (the paper's 256 is one node's batch): each of the ``W`` processes
  loads ``data.batch_size / W`` images; a batch that does not split evenly is refused naming the key. The learning
  rate is ``optim.lr`` as configured unless ``optim.lr_scaling=linear`` asks for ``optim.lr x global batch /
  optim.lr_reference_batch``; either way the start-up line states the per-process batch, the global batch and the
  learning rate.
* Gathers (:func:`all_gather_cat`) use ``torch.distributed.all_gather_into_tensor``, not the deprecated functional
  ``torch.distributed.nn.functional.all_gather`` that ``LightningModule.all_gather`` calls (and warns about at every
  step). What is gathered is keys, indices and scores, never something a gradient flows through.
* ``broadcast_buffers=False`` is kept although torch now warns that the argument is deprecated: its replacement
  (``forward_sync_buffers=False``) still broadcasts the buffers once at start-up, and torch's own message says to keep
  ``broadcast_buffers=False`` until ``init_sync_buffers`` exists. :class:`QuietDDPStrategy` silences exactly that one
  warning; ``tests/test_ddp.py`` counts the bytes of every collective and fails if a buffer is ever broadcast.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from .config import ConfigError

log = logging.getLogger("compress_lit.distributed")  # the name it always had


# torch's FutureWarning for DistributedDataParallel(broadcast_buffers=...), which it says to keep using for now
BROADCAST_BUFFERS_WARNING = r"`broadcast_buffers` is deprecated\. Use `forward_sync_buffers` instead"


def _quiet_strategy_class():
    from pytorch_lightning.strategies import DDPStrategy

    class QuietDDPStrategy(DDPStrategy):
        """Lightning's DDP strategy, with torch's deprecation warning for ``broadcast_buffers`` silenced where the
        model is wrapped (the only place it is raised); every other warning passes."""

        def _setup_model(self, model):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=BROADCAST_BUFFERS_WARNING, category=FutureWarning)
                return super()._setup_model(model)

    QuietDDPStrategy.__qualname__ = "QuietDDPStrategy"
    return QuietDDPStrategy


def __getattr__(name: str):
    if name == "QuietDDPStrategy":  # built on first use: importing this module does not import Lightning
        if name not in globals():
            globals()[name] = _quiet_strategy_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ddp_strategy(name: str, **kwargs):
    """Lightning's registered DDP strategy ``name`` (its start method etc.), without the per-step buffer
    broadcast. ``kwargs`` go to the strategy (e.g. ``ddp_comm_hook``) or on to ``DistributedDataParallel``."""
    from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry

    entry = StrategyRegistry[name]
    if not issubclass(entry["strategy"], DDPStrategy):
        raise ValueError(f"{name!r} is not a DDP strategy")
    cls = __getattr__("QuietDDPStrategy") if entry["strategy"] is DDPStrategy else entry["strategy"]
    return cls(**{**entry["init_params"], "broadcast_buffers": False, **kwargs})


def all_gather_cat(t: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """``t`` from every process concatenated along dim 0 in rank order (``t`` itself without an initialised process
    group of more than one process). No gradient flows through it (as ``LightningModule.all_gather``'s default)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.detach().contiguous()
    out = t.new_empty((dist.get_world_size() * t.shape[0], *t.shape[1:]))
    dist.all_gather_into_tensor(out, t)
    return out


def is_ddp_name(strategy) -> bool:
    if not isinstance(strategy, str):
        return False
    from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry

    entry = dict.get(StrategyRegistry, strategy)  # (its own .get builds the strategy)
    return entry is not None and issubclass(entry["strategy"], DDPStrategy)


def per_process_batch(global_batch: int, world_size: int, key: str = "data.batch_size") -> int:
    """The batch each of ``world_size`` processes loads so that together they make ``global_batch``."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if global_batch % world_size:
        raise ConfigError(f"{key}={global_batch} is the global batch and must split evenly over the {world_size} "
                          f"processes (devices x nodes): choose a multiple of {world_size}")
    return global_batch // world_size


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    world_size: int
    per_process: int
    base_lr: float
    lr_scaling: str
    reference_batch: int

    @property
    def lr(self) -> float:
        if self.lr_scaling == "linear":
            return self.base_lr * self.global_batch / self.reference_batch
        return self.base_lr

    def describe(self) -> str:
        scaling = (f"optim.lr_scaling=linear: {self.base_lr:g} x {self.global_batch}/{self.reference_batch}"
                   if self.lr_scaling == "linear" else "optim.lr_scaling=none")
        return (f"batch: {self.per_process} per process x {self.world_size} process"
                f"{'es' if self.world_size != 1 else ''} = global batch {self.global_batch} (data.batch_size); "
                f"learning rate {self.lr:g} ({scaling})")


def plan_batch(cfg: DictConfig, world_size: int) -> BatchPlan:
    """The batch split and learning rate of a run of ``cfg`` on ``world_size`` processes (refuses an uneven split)."""
    per = per_process_batch(int(cfg.data.batch_size), world_size)
    return BatchPlan(global_batch=int(cfg.data.batch_size), world_size=int(world_size), per_process=per,
                     base_lr=float(cfg.optim.lr), lr_scaling=str(cfg.optim.get("lr_scaling", "none")),
                     reference_batch=int(cfg.optim.get("lr_reference_batch", 256)))


def apply_batch_plan(cfg: DictConfig, trainer, module, logger=None) -> BatchPlan:
    """Check the split for ``trainer.world_size``, give ``module`` the learning rate of the plan (a copy of
    ``cfg.optim`` with ``lr`` replaced), print the start-up line once and record it with the logger."""
    plan = plan_batch(cfg, trainer.world_size)
    optim = OmegaConf.create(OmegaConf.to_container(cfg.optim, resolve=True))
    optim.lr = plan.lr
    module.optim_cfg = optim
    if trainer.is_global_zero:
        print(f"[compress_lit] {plan.describe()}", flush=True)
        if logger:
            logger.log_hyperparams({"batch/global": plan.global_batch, "batch/per_process": plan.per_process,
                                    "batch/processes": plan.world_size, "optim/effective_lr": plan.lr})
    return plan
