"""No host synchronisation in a training step (CPU-side proxy of ``torch.cuda.set_sync_debug_mode``, which
``benchmarks/gpu_check.py`` uses on a GPU): while our step and its end-of-batch hook run, no tensor is turned into
a Python value (``bool``/``int``/``float``/``item``/``tolist``/``numpy``). On a GPU each of those waits for the
device. The non-finite-loss check still names the step, one step late."""
import contextlib

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from compress_lit.methods.anchor_queue import AnchorQueue
from compress_lit.runtime.nonfinite import LossWatch, WeightWatch
from test_methods import VARIANTS, FixedBatch, make_module

SYNCING = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy")


class SyncCounter:
    """Counts tensor-to-Python conversions made while ``counting`` is on."""

    def __init__(self, monkeypatch):
        self.on, self.calls = False, []
        for name in SYNCING:
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, __orig=orig, __name=name, **k):
                if self.on:
                    self.calls.append(__name)
                return __orig(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, wrapped)

    @contextlib.contextmanager
    def counting(self):
        self.on = True
        try:
            yield
        finally:
            self.on = False


def _count_in(module, counter, names=("training_step", "on_train_batch_end")):
    for name in names:
        orig = getattr(module, name)

        def wrapped(*a, __orig=orig, **k):
            with counter.counting():
                return __orig(*a, **k)
        setattr(module, name, wrapped)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_step_and_enqueue_make_no_host_sync(variant, tmp_path, monkeypatch):
    module = make_module(variant, queue_size=40)
    counter = SyncCounter(monkeypatch)
    _count_in(module, counter)
    # LossWatch reads its flags in _check: on a GPU a pinned host copy whose CUDA event has completed (no wait;
    # gpu_check.py verifies that with the sync debug mode), on the CPU the flag itself. Not counted, but counted up.
    # The parameters-and-buffers watch (WeightWatch, a callback of every training run) goes the same way.
    checked = []
    orig_check = LossWatch._check

    def check(self, flag, event, where):
        on, counter.on = counter.on, False
        checked.append((self.what, where))
        try:
            return orig_check(self, flag, event, where)
        finally:
            counter.on = on
    monkeypatch.setattr(LossWatch, "_check", check)
    watch = WeightWatch()
    _count_in(watch, counter, names=("on_train_batch_end",))
    pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=tmp_path, callbacks=[watch]).fit(
        module, DataLoader(FixedBatch(steps=4), batch_size=32, shuffle=False))
    assert counter.calls == [], counter.calls
    steps = [f"global step {i} (epoch 0, batch {i})" for i in range(4)]
    assert [w for what, w in checked if what == "loss"] == steps
    # the watch runs after the optimizer step: the step counter has moved on
    assert [w for what, w in checked if what == "parameters or buffers"] == \
        [f"global step {i + 1} (epoch 0, batch {i})" for i in range(4)]
    assert int(module.queues.ptr) == (4 * 32) % 40 and int(module.queues.num_enqueued) == 128


def test_the_proxy_catches_a_sync(monkeypatch):
    counter = SyncCounter(monkeypatch)
    with counter.counting():
        if torch.isfinite(torch.tensor(1.0)):  # what the step used to do
            pass
        int(torch.tensor(3))
    assert counter.calls == ["__bool__", "__int__"]


def test_queue_enqueue_wraps_without_reading_the_pointer(monkeypatch):
    q = AnchorQueue(5, {"a": 2})
    counter = SyncCounter(monkeypatch)
    with counter.counting():
        q.enqueue(a=torch.arange(8.0).reshape(4, 2))
        q.enqueue(a=torch.arange(8.0, 14.0).reshape(3, 2))  # slots 4, 0, 1
    assert counter.calls == []
    assert q.bank("a").tolist() == [[10, 11], [12, 13], [4, 5], [6, 7], [8, 9]]
    assert int(q.ptr) == 2 and int(q.num_enqueued) == 7


def test_loss_watch_names_the_step_of_a_non_finite_loss():
    w = LossWatch()
    w.push(torch.tensor(1.0), "global step 0")
    assert len(w) == 0  # on the CPU a flag is there at once
    with pytest.raises(FloatingPointError, match="non-finite loss at global step 1 \\(epoch 0, batch 1\\)"):
        w.push(torch.tensor(float("nan")), "global step 1 (epoch 0, batch 1)")
