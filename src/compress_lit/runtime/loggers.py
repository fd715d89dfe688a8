"""Experiment loggers: W&B (offline unless credentials are there; never prompts, never hangs), CSV, or none.

A resumed run's CSV logger starts with the rows the run logged before its checkpoint (``history``, see
:func:`compress_lit.runtime.resume.prepare_resume`), so ``metrics.csv`` holds the whole run once.
"""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

log = logging.getLogger("compress_lit.loggers")  # the name it always had


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
    return rc.authenticators(host) is not None


def resolve_wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "online" if wandb_credentials_present() else "offline"


def wandb_mode_message(requested: str, mode: str) -> str | None:
    """The log line saying why W&B does not run online (None when it does)."""
    if mode == "online":
        return None
    if requested == "auto":
        return (f"W&B runs {mode}: no W&B credentials were found (WANDB_API_KEY or ~/.netrc; `wandb login`); "
                f"`wandb sync` uploads the run later")
    return f"W&B runs {mode} (logger.mode={requested})" + ("; `wandb sync` uploads the run later"
                                                            if mode == "offline" else "")


def _csv_logger(save_dir: str, flush_every_n_steps: int, history: list[dict] | None):
    from pytorch_lightning.loggers import CSVLogger

    class ContinuedCSVLogger(CSVLogger):
        """A CSVLogger continuing a run in place: when it first writes, the earlier ``metrics.csv`` and
        ``hparams.yaml`` are replaced, the new file starting with ``history`` (the rows logged before the
        checkpoint's step). Until then the earlier files stay as they were (a resume that fails changes nothing)."""

        def __init__(self, *args, history: list[dict] | None = None, **kw):
            super().__init__(*args, **kw)
            self._history = list(history or [])

        @property
        def experiment(self):
            if self._experiment is None:
                for stale in ("metrics.csv", "hparams.yaml"):
                    Path(self.log_dir, stale).unlink(missing_ok=True)
                exp = super().experiment
                if self._history and hasattr(exp, "metrics"):
                    exp.metrics[:0] = self._history  # written with the first flush, before the new rows
                    self._history = []
                return exp
            return super().experiment

    cls = ContinuedCSVLogger if history is not None else CSVLogger
    kw = {"history": history} if history is not None else {}
    return cls(save_dir, name="csv", version="", flush_logs_every_n_steps=flush_every_n_steps, **kw)


def build_logger(cfg, save_dir: str | Path, run_name: str | None = None, config: dict | None = None,
                 group: str | None = None, history: list[dict] | None = None):
    """A Lightning logger from a LoggerConfig, or False for ``none``. ``group``: the W&B group when
    ``logger.group`` is null (a Hydra multirun passes the sweep's name, see reporting.hydra_run_identity).
    ``history``: CSV rows a resumed run logged before its checkpoint, written first (None: a run that does not
    continue a CSV log in place)."""
    save_dir = str(save_dir)
    if cfg.name == "none":
        return False
    if cfg.name == "csv":
        return _csv_logger(save_dir, cfg.flush_every_n_steps, history)
    from pytorch_lightning.loggers import WandbLogger

    mode = resolve_wandb_mode(cfg.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    message = wandb_mode_message(cfg.mode, mode)
    if message:
        log.info(message)
    import wandb

    if wandb.run is not None:  # left open by an earlier run in this process (a failed multirun job): close it
        wandb.finish()
    logger = WandbLogger(project=cfg.project, entity=cfg.entity, group=cfg.group or group, name=run_name,
                         save_dir=save_dir, mode=mode, log_model=cfg.log_model)
    if config:
        logger.log_hyperparams(config)
    return logger
