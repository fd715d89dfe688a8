"""``trainer.fit`` as every training entry point runs it: the resume checkpoint read weights-only, and SIGTERM
(what SLURM and Kubernetes send before a kill) ending in a resumable checkpoint and exit status 143.

Lightning turns SIGTERM into a ``SIGTERMException`` after the current batch (under DDP every rank gets it).
:class:`SaveOnSigterm` writes ``<run_dir>/hpc_ckpt_<n>.ckpt`` then, the file ``resume=auto`` continues from (as
after a SLURM requeue signal), and :func:`fit` writes one line to the console and the run's log and exits with
143 (128 + SIGTERM), as a process killed by the signal would, so a scheduler sees that the job did not finish. The
one exception is SLURM auto-requeue, where Lightning has already requeued the job: the exit status is left to it.
The resume continues at the signal's step (Lightning's mid-epoch restore; the bit-exact guarantee of
``docs/reliability.md`` is for the end-of-epoch checkpoints).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger("compress_lit")
SIGTERM_EXIT = 143


def next_hpc_path(run_dir: Path) -> Path:
    """``hpc_ckpt_<n>.ckpt`` with ``n`` one above the highest there (Lightning's naming for requeue saves)."""
    ns = [int(p.stem.rsplit("_", 1)[1]) for p in run_dir.glob("hpc_ckpt_*.ckpt") if p.stem.rsplit("_", 1)[1].isdigit()]
    return run_dir / f"hpc_ckpt_{max(ns, default=0) + 1}.ckpt"


class SaveOnSigterm(pl.Callback):
    """On Lightning's ``SIGTERMException`` during fitting: a resumable checkpoint in the run directory."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.saved: Path | None = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or not trainer.training:
            return
        path = next_hpc_path(self.run_dir)
        trainer.save_checkpoint(path)  # through the atomic checkpoint IO; every rank takes part
        self.saved = path


def _requeue_took_over(trainer: pl.Trainer) -> bool:
    from lightning_fabric.plugins.environments import SLURMEnvironment

    env = trainer._accelerator_connector.cluster_environment
    return isinstance(env, SLURMEnvironment) and env.auto_requeue


def fit(trainer: pl.Trainer, module: pl.LightningModule, datamodule, checkpoint: str | None, run_dir: Path) -> None:
    """``trainer.fit`` resuming from ``checkpoint`` (read weights-only; the uint32 numpy RNG state of checkpoints
    written before plain-container RNG states is the one extra type allowed), with the SIGTERM handling above."""
    from .safety import _numpy_array_globals
    from .startup import write_to_run_log

    saver = next((c for c in trainer.callbacks if isinstance(c, SaveOnSigterm)), None)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
    except SIGTERMException:
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch})"
        saved = saver.saved if saver is not None else None
        line = (f"SIGTERM at {where}: saved {saved}; continue with the same command and resume=auto"
                if saved else f"SIGTERM at {where}: no checkpoint could be saved")
        if trainer.is_global_zero:
            print(f"[compress_lit] {line}", flush=True)
            write_to_run_log(run_dir, line, level=logging.WARNING)
        if _requeue_took_over(trainer):
            raise
        raise SystemExit(SIGTERM_EXIT) from None
    except SystemExit:
        if trainer.interrupted:  # Lightning turned Ctrl-C into sys.exit(1): the entry point's one line says so
            raise KeyboardInterrupt from None
        raise


__all__ = ["SIGTERM_EXIT", "SaveOnSigterm", "fit", "next_hpc_path"]
