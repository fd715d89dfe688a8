"""`data.batch_size` is the global batch: split evenly over the processes (an uneven split fails at start-up naming
the key), stated at start-up with the learning rate, which changes only when `optim.lr_scaling` asks for it."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from compress_lit.runtime.config import ConfigError, validate_train
from compress_lit.data import build_datamodule
from compress_lit.runtime.distributed import apply_batch_plan, per_process_batch, plan_batch
from compress_lit.train import CONF_DIR
from compress_lit.training.run import build_trainer, run_train


def cfg_of(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_split_is_exact_or_refused_naming_the_key():
    assert per_process_batch(256, 1) == 256 and per_process_batch(256, 8) == 32
    with pytest.raises(ConfigError, match=r"data.batch_size=256 is the global batch .* 3 processes"):
        per_process_batch(256, 3)


def test_learning_rate_is_unchanged_unless_scaling_is_asked_for():
    cfg = cfg_of("data.batch_size=2048", "optim.lr=0.01")
    plan = plan_batch(cfg, 8)
    assert (plan.per_process, plan.global_batch, plan.lr) == (256, 2048, 0.01)
    assert plan.describe() == ("batch: 256 per process x 8 processes = global batch 2048 (data.batch_size); "
                               "learning rate 0.01 (optim.lr_scaling=none)")
    cfg = cfg_of("data.batch_size=2048", "optim.lr=0.01", "optim.lr_scaling=linear")
    plan = plan_batch(cfg, 8)
    assert plan.lr == pytest.approx(0.01 * 2048 / 256)
    assert "learning rate 0.08 (optim.lr_scaling=linear: 0.01 x 2048/256)" in plan.describe()
    with pytest.raises(ConfigError, match=r"optim.lr_scaling='sqrt' is invalid"):
        validate_train(cfg_of("optim.lr_scaling=sqrt"))


def test_the_module_gets_the_planned_learning_rate_and_the_line_is_printed(capsys):
    cfg = cfg_of("data.batch_size=64", "optim.lr=0.02", "optim.lr_scaling=linear", "optim.lr_reference_batch=32")
    module = SimpleNamespace(optim_cfg=cfg.optim)
    plan = apply_batch_plan(cfg, SimpleNamespace(world_size=2, is_global_zero=True), module)
    assert module.optim_cfg.lr == pytest.approx(0.04) and cfg.optim.lr == 0.02  # the config is left as given
    assert plan.per_process == 32
    assert "batch: 32 per process x 2 processes = global batch 64" in capsys.readouterr().out


def test_each_process_loads_its_share():
    cfg = cfg_of("data.batch_size=64", "data.train_subset=256")
    dm = build_datamodule(cfg.data)
    dm.trainer = SimpleNamespace(world_size=4, accelerator=None)
    assert dm.train_dataloader().batch_size == 16
    dm.trainer = SimpleNamespace(world_size=1, accelerator=None)
    assert dm.train_dataloader().batch_size == 64


def test_uneven_split_fails_before_any_data_is_read(tmp_path, monkeypatch):
    cfg = cfg_of("trainer=cpu", "trainer.devices=2", "+trainer.strategy=ddp", "data.batch_size=63",
                 "teacher.format=random", "teacher.pretrain_if_missing=false")
    import compress_lit.training.run as train_mod

    def no_data(*a, **k):
        raise AssertionError("data was read")
    monkeypatch.setattr(train_mod, "build_datamodule", no_data)
    with pytest.raises(ConfigError, match=r"data.batch_size=63 is the global batch .* 2 processes"):
        run_train(cfg, tmp_path / "run")


def test_ddp_strategy_of_the_trainer_broadcasts_no_buffers(tmp_path):
    cfg = cfg_of("trainer=cpu", "trainer.devices=2", "+trainer.strategy=ddp")
    trainer = build_trainer(cfg, tmp_path, logger=False)
    assert trainer.strategy._ddp_kwargs["broadcast_buffers"] is False and trainer.world_size == 2


def test_two_processes_through_the_command_line(tmp_path):
    """A real 2-process (gloo) run of `python -m compress_lit.train`: the start-up line, and a queue pointer that
    advanced by the global batch at each step."""
    args = ["trainer=cpu", "trainer.devices=2", "+trainer.strategy=ddp", "data.batch_size=64",
            "data.train_subset=256", "method.queue_size=256", "+trainer.max_steps=2", "optim.epochs=1",
            "eval.at_end=false", "teacher.format=random", "teacher.pretrain_if_missing=false",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "data.num_workers=0",
            f"hydra.run.dir={tmp_path}/run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", COMPRESS_LIT_CACHE=str(tmp_path / "cache"),
               MASTER_PORT=str(29000 + os.getpid() % 500))
    out = subprocess.run([sys.executable, "-m", "compress_lit.train", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("batch: 32 per process x 2 processes = global batch 64 (data.batch_size); "
                            "learning rate 0.05 (optim.lr_scaling=none)") == 1  # rank 0 only
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert int(ckpt["state_dict"]["queues.ptr"]) == 128 and int(ckpt["state_dict"]["queues.num_enqueued"]) == 128
    OmegaConf.create(ckpt["hyper_parameters"]["config"])  # the saved config is intact
