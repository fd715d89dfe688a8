"""Bad input that the other test files do not already cover (see the bad-input table in docs/reliability.md):
non-finite loss, unwritable or full output folders, and atomic checkpoint writes."""
import errno
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from compress_lit.runtime.config import register_configs
from compress_lit.runtime.safety import AtomicCheckpointIO, DiskFullError, StartupError, atomic_copy, check_writable
from compress_lit.training.run import build_trainer
from test_methods import FixedBatch, make_module

CONF = str(Path(__file__).resolve().parents[1] / "conf")
register_configs()


class NaNAfter(FixedBatch):
    """Finite images for the first `good` samples read (over all epochs), then NaN images."""

    def __init__(self, good, **kw):
        super().__init__(**kw)
        self.good, self.served = good, 0

    def __getitem__(self, i):
        x, y, idx = super().__getitem__(i)
        self.served += 1
        return (x if self.served <= self.good else torch.full_like(x, float("nan"))), y, idx


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["optim.epochs=3", "trainer.enable_progress_bar=false",
                                                      "trainer.enable_model_summary=false"])
    trainer = build_trainer(cfg, tmp_path, logger=False)
    module = make_module("compress_2q")
    # 4 steps of 32 per epoch; the NaNs start in the 3rd step of epoch 1 (global step 6)
    loader = DataLoader(NaNAfter(good=32 * 6, steps=4), batch_size=32, shuffle=False)
    with pytest.raises(FloatingPointError, match=r"global step 6 \(epoch 1, batch 2\)"):
        trainer.fit(module, loader)
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_unwritable_run_dir_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(StartupError, match=str(blocker / "run")):
        check_writable(blocker / "run", "the run directory")


def test_full_disk_is_refused_at_start_up(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    with pytest.raises(StartupError, match=r"only 0\.00 GiB free") as e:
        check_writable(tmp_path, "the run directory", min_free_gb=0.5)
    assert str(tmp_path) in str(e.value)


def test_checkpoint_write_failure_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, path)
    good = path.read_bytes()

    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DiskFullError, match=f"disk full while writing the checkpoint {path}"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == good and torch.load(path)["epoch"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left behind


def test_atomic_copy_replaces_whole_file(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    dst = tmp_path / "teachers" / "t.ckpt"
    atomic_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dst.parent.iterdir()) == ["t.ckpt"]
