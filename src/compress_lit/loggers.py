"""Experiment loggers: W&B (offline unless credentials are there; never prompts, never hangs), CSV, or none."""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

log = logging.getLogger(__name__)


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


def build_logger(cfg, save_dir: str | Path, run_name: str | None = None, config: dict | None = None,
                 group: str | None = None):
    """A Lightning logger from a LoggerConfig, or False for ``none``. ``group``: the W&B group when
    ``logger.group`` is null (a Hydra multirun passes the sweep's name, see reporting.hydra_run_identity)."""
    save_dir = str(save_dir)
    if cfg.name == "none":
        return False
    if cfg.name == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir, name="csv", version="", flush_logs_every_n_steps=cfg.flush_every_n_steps)
    from pytorch_lightning.loggers import WandbLogger

    mode = resolve_wandb_mode(cfg.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    if mode != "online":
        log.info("W&B runs %s (no credentials found, or logger.mode=%s); `wandb sync` uploads it later",
                 mode, cfg.mode)
    import wandb

    if wandb.run is not None:  # left open by an earlier run in this process (a failed multirun job): close it
        wandb.finish()
    logger = WandbLogger(project=cfg.project, entity=cfg.entity, group=cfg.group or group, name=run_name,
                         save_dir=save_dir, mode=mode, log_model=cfg.log_model)
    if config:
        logger.log_hyperparams(config)
    return logger
