"""CompReSS 2q / 2q-without-momentum / 1q as LightningModules: training, EMA, queues, checkpoints."""
import copy

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from compress_lit.runtime.config import ConfigError, OptimConfig
from compress_lit.losses.compress import compress_loss
from compress_lit.methods import CompReSS
from compress_lit.models import build_backbone
from compress_lit.teachers import FrozenTeacher

VARIANTS = {
    "compress_2q": dict(use_momentum_encoder=True, one_queue=False),
    "compress_2q_nomomentum": dict(use_momentum_encoder=False, one_queue=False),
    "compress_1q": dict(use_momentum_encoder=False, one_queue=True),
}


class FixedBatch(Dataset):
    """The same 32 images every step (a fixed batch), with labels and indices."""

    def __init__(self, n=32, steps=40):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.n, self.steps = n, steps

    def __len__(self):
        return self.n * self.steps

    def __getitem__(self, i):
        return self.x[i % self.n], 0, i % self.n


def make_module(variant="compress_2q", queue_size=64, momentum=0.9, lr=0.05, seed=0, teacher_seed=0):
    torch.manual_seed(teacher_seed)
    teacher = FrozenTeacher(build_backbone("resnet18", small_input=True, width_multiplier=0.25))
    torch.manual_seed(seed)
    student = build_backbone("resnet18", small_input=True, width_multiplier=0.125)
    optim = OmegaConf.structured(OptimConfig(lr=lr, epochs=1, scheduler="constant", milestones=[]))
    return CompReSS(student, teacher, optim, queue_size=queue_size, momentum=momentum, **VARIANTS[variant])


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(module, steps, tmp_path, ckpt_path=None, callbacks=()):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=list(callbacks))
    trainer.fit(module, DataLoader(FixedBatch(), batch_size=32, shuffle=False), ckpt_path=ckpt_path,
                weights_only=False)
    return trainer


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_and_loss_decreases_on_a_fixed_batch(variant, tmp_path):
    module = make_module(variant)
    teacher_before = copy.deepcopy(module.teacher.state_dict())
    rec = LossRecorder()
    fit(module, 30, tmp_path, callbacks=[rec])
    assert len(rec.losses) == 30 and all(torch.isfinite(torch.tensor(rec.losses)))
    # steps 0-1 score against the random initial queue; from step 2 the queue holds real keys
    early, late = sum(rec.losses[2:5]) / 3, sum(rec.losses[-3:]) / 3
    assert late < 0.9 * early, (variant, rec.losses)
    # the teacher stayed frozen and in eval mode: weights *and* BatchNorm running statistics unchanged
    module.teacher.assert_frozen()
    assert not module.teacher.training and not any(m.training for m in module.teacher.modules())
    for k, v in module.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_batch_never_scores_against_itself_and_is_enqueued_after():
    module = make_module("compress_2q", queue_size=16)
    x = torch.randn(4, 3, 16, 16)
    t_emb = module.teacher(x)
    s_emb = module.student(x)
    bank_t, bank_s = module.queues.bank("teacher").clone(), module.queues.bank("student").clone()
    loss, _ = module.distill(x, s_emb, t_emb)
    # the loss used the queue as it was before this batch
    torch.testing.assert_close(loss, compress_loss(s_emb, t_emb, bank_s, bank_t, 0.04))
    torch.testing.assert_close(module.queues.bank("teacher"), bank_t)  # nothing written before the backward
    loss.backward()  # the queue must still be intact for autograd
    module.on_train_batch_end(None, None, 0)
    # and only then the batch was written: normalised teacher embeddings in slots 0..3, the rest untouched
    torch.testing.assert_close(module.queues.bank("teacher")[:4], torch.nn.functional.normalize(t_emb, dim=1))
    torch.testing.assert_close(module.queues.bank("teacher")[4:], bank_t[4:])
    assert int(module.queues.ptr) == 4
    # had the batch been enqueued first, each sample's own key (similarity 1/T = 25) would dominate:
    module2 = make_module("compress_2q", queue_size=16)
    module2.queues.enqueue(teacher=torch.nn.functional.normalize(t_emb, dim=1),
                           student=torch.nn.functional.normalize(module2.student_momentum(x), dim=1))
    loss_self, _ = module2.distill(x, module2.student(x), t_emb)
    assert not torch.isclose(loss_self, loss)


def test_momentum_student_is_an_ema_of_the_student(tmp_path):
    module = make_module("compress_2q", momentum=0.9)
    before = [p.detach().clone() for p in module.student_momentum.parameters()]
    fit(module, 1, tmp_path)
    for p_m, p_old, p_s in zip(module.student_momentum.parameters(), before, module.student.parameters()):
        torch.testing.assert_close(p_m, 0.9 * p_old + 0.1 * p_s.detach())
        assert not p_m.requires_grad


def test_1q_projection_is_trained_and_dropped_at_evaluation(tmp_path):
    module = make_module("compress_1q")
    w0 = module.projection.weight.detach().clone()
    fit(module, 3, tmp_path)
    assert not torch.equal(w0, module.projection.weight)
    assert module.queues.bank_names == ("teacher",)
    out = module(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, module.student.embed_dim) != (2, module.teacher_dim)
    with pytest.raises(ValueError, match="1q"):
        make_module("compress_1q").__class__(module.student, module.teacher, module.optim_cfg,
                                             one_queue=True, use_momentum_encoder=True)


def test_checkpoint_holds_queues_pointer_and_momentum_student_but_not_the_teacher(tmp_path):
    module = make_module("compress_2q", queue_size=80)
    trainer = fit(module, 3, tmp_path)  # 96 keys into 80 slots: wrapped
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    sd = torch.load(path, weights_only=False)["state_dict"]
    assert {"queues.bank_teacher", "queues.bank_student", "queues.ptr", "queues.num_enqueued"} <= set(sd)
    assert any(k.startswith("student_momentum.") for k in sd)
    assert not any(k.startswith("teacher.") for k in sd)
    assert int(sd["queues.ptr"]) == 96 % 80

    # restore into a fresh module (different random init) through Lightning's resume path
    fresh = make_module("compress_2q", queue_size=80, seed=1)
    fit(fresh, 3, tmp_path, ckpt_path=path)  # already at step 3: loads, runs no step
    for k, v in module.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, msg=k)


def test_resuming_with_another_teacher_is_refused(tmp_path):
    module = make_module("compress_2q")
    trainer = fit(module, 1, tmp_path)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    other = make_module("compress_2q", teacher_seed=5)  # another random teacher
    with pytest.raises(ConfigError, match="another teacher"):
        fit(other, 2, tmp_path, ckpt_path=tmp_path / "m.ckpt")


@pytest.mark.parametrize("variant", ["compress_2q", "compress_1q"])
def test_training_head_is_the_training_embedding_and_dropped_at_evaluation(variant, tmp_path):
    """student.train_head_dim (docs/paper.md: ResNet-50 student 2048 -> 8192 in training only): the queues and the 1q
    projection live in the head's space, the momentum head is an EMA of the head, evaluation uses the backbone."""
    from compress_lit.evaluation.loading import load_student_checkpoint

    base = make_module(variant, momentum=0.9)
    torch.manual_seed(0)
    module = CompReSS(base.student, base.teacher, base.optim_cfg, queue_size=64, momentum=0.9,
                      train_head_dim=48, **VARIANTS[variant],
                      config={"student": {"arch": "resnet18", "small_input": True, "width_multiplier": 0.125}})
    backbone_dim = module.student.embed_dim
    assert module.student_dim == 48 != backbone_dim and module.train_head.in_features == backbone_dim
    if variant == "compress_1q":
        assert module.projection.in_features == 48 and module.train_head_momentum is None
    else:
        assert module.queues.bank("student").shape == (64, 48)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(module.training_embedding(x), module.train_head(module.student(x)))
    if variant == "compress_2q":  # the student queue receives the momentum head's keys
        with torch.no_grad():
            keys = torch.nn.functional.normalize(module.train_head_momentum(module.student_momentum(x)), dim=1)
        loss, _ = module.distill(x, module.training_embedding(x), module.teacher(x))
        loss.backward()
        module.on_train_batch_end(None, None, 0)
        torch.testing.assert_close(module.queues.bank("student")[:4], keys)
    head0 = copy.deepcopy(module.train_head)
    mom0 = copy.deepcopy(module.train_head_momentum)
    module.zero_grad()
    trainer = fit(module, 1, tmp_path)
    assert not torch.equal(head0.weight, module.train_head.weight)  # the head is trained
    if mom0 is not None:
        for p_m, p_old, p_h in zip(module.train_head_momentum.parameters(), mom0.parameters(),
                                   module.train_head.parameters()):
            torch.testing.assert_close(p_m, 0.9 * p_old + 0.1 * p_h.detach())
    module.eval()
    assert module(x).shape == (4, backbone_dim)  # evaluation / export: the backbone alone
    path = tmp_path / "h.ckpt"
    trainer.save_checkpoint(path)
    sd = torch.load(path, weights_only=False)["state_dict"]
    assert "train_head.weight" in sd
    loaded = load_student_checkpoint(path)  # strict: the head's keys are not the student's
    torch.testing.assert_close(loaded.model(x), module.student.eval()(x))
