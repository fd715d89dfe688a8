"""Loggers: W&B goes offline without credentials (never prompts), CSV works, credentials are detected."""
import os

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from compress_lit.runtime.config import LoggerConfig
from compress_lit.runtime.loggers import build_logger, resolve_wandb_mode, wandb_credentials_present


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_credentials_detection(no_credentials, monkeypatch):
    assert not wandb_credentials_present() and resolve_wandb_mode("auto") == "offline"
    (no_credentials / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    assert wandb_credentials_present() and resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"
    (no_credentials / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_credentials_present()


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def training_step(self, batch, _):
        loss = self.lin(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(logger, tmp_path):
    trainer = pl.Trainer(max_steps=3, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(12, 4)), batch_size=4))


def test_wandb_runs_offline_without_credentials(no_credentials, tmp_path):
    cfg = OmegaConf.structured(LoggerConfig(name="wandb", mode="auto", project="compress_lit_test"))
    logger = build_logger(cfg, tmp_path / "run", run_name="t", config={"method": {"queue_size": 7}})
    _fit(logger, tmp_path)
    import wandb

    assert logger.experiment.settings.mode == "offline"
    wandb.finish()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_csv_logger_writes_metrics(tmp_path):
    logger = build_logger(OmegaConf.structured(LoggerConfig(name="csv")), tmp_path)
    _fit(logger, tmp_path)
    text = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss" in text.splitlines()[0] and len(text.splitlines()) >= 4


def test_none_logger():
    assert build_logger(OmegaConf.structured(LoggerConfig(name="none")), ".") is False
