"""The paper's baselines (Regression, Regression-BN, CRD, CC, Supervised): losses against hand computations,
memories and cluster ids in checkpoints, CC's k-means computed once, and each one training on a fixed batch."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from compress_lit.runtime.config import METHODS, OptimConfig, register_configs, validate_train
from compress_lit.evaluation.cluster import assign, kmeans
from compress_lit.methods import CRD, SEED, ClusterClassification, CompReSS, DisCo, Regression, SimReg, Supervised
from compress_lit.methods.baselines import sample_negative_indices
from compress_lit.models import build_backbone
from compress_lit.teachers import FrozenTeacher
from compress_lit.methods.build import build_method
from test_config import CONF

register_configs()
N, CLASSES = 32, 4


class Fixed(Dataset):
    """The same N images every epoch of ``steps`` batches, labels i % CLASSES, dataset index i % N."""

    def __init__(self, steps=1):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 3, 16, 16, generator=g)
        self.steps = steps

    def __len__(self):
        return N * self.steps

    def __getitem__(self, i):
        return self.x[i % N], (i % N) % CLASSES, i % N


class FixedDM(pl.LightningDataModule):
    def __init__(self, steps=40):
        super().__init__()
        self.steps = steps

    def train_dataloader(self):
        return DataLoader(Fixed(self.steps), batch_size=N, shuffle=False)

    def train_eval_dataloader(self):
        return DataLoader(Fixed(1), batch_size=8, shuffle=False)


def nets(seed=0, teacher_seed=0):
    torch.manual_seed(teacher_seed)
    teacher = FrozenTeacher(build_backbone("resnet18", small_input=True, width_multiplier=0.25))
    torch.manual_seed(seed)
    student = build_backbone("resnet18", small_input=True, width_multiplier=0.125)
    return student, teacher


def optim(lr=0.05):
    return OmegaConf.structured(OptimConfig(lr=lr, epochs=1, scheduler="constant", milestones=[]))


def make(method, seed=0, lr=0.05, **kw):
    student, teacher = nets(seed)
    if method in ("regression", "regression_bn"):
        return Regression(student, teacher, optim(lr), bn=method == "regression_bn", **kw)
    if method == "crd":
        return CRD(student, teacher, optim(lr), num_samples=N, num_negatives=kw.pop("num_negatives", 16), **kw)
    if method == "cc":
        return ClusterClassification(student, teacher, optim(lr), num_samples=N,
                                     num_clusters=kw.pop("num_clusters", 8), **kw)
    if method == "supervised":
        return Supervised(student, teacher, optim(lr), num_classes=CLASSES, **kw)
    raise ValueError(method)


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(module, steps, tmp_path, ckpt_path=None, callbacks=()):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=list(callbacks))
    trainer.fit(module, datamodule=FixedDM(), ckpt_path=ckpt_path, weights_only=False)
    return trainer


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g)


def _normalise(v):
    return v / v.norm(dim=1, keepdim=True)


# ------------------------------------------------------------------------------------------------ Regression
@pytest.mark.parametrize("bn", [False, True])
def test_regression_loss_is_the_mean_squared_distance_of_normalised_embeddings(bn):
    module = make("regression_bn" if bn else "regression")
    module.train()
    x = batch()
    s, t = module.student(x), module.teacher(x)
    loss, _ = module.distill(x, s, t)
    lin = module.regressor[0]
    pred = s @ lin.weight.t() + lin.bias
    if bn:  # train mode: batch statistics, biased variance; gamma = 1, beta = 0 at init
        bn_layer = module.regressor[1]
        pred = (pred - pred.mean(0)) / torch.sqrt(pred.var(0, unbiased=False) + bn_layer.eps)
        pred = pred * bn_layer.weight + bn_layer.bias
    p, q = _normalise(pred), _normalise(t)
    expected = ((p - q) ** 2).sum(1).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, (2 - 2 * (p * q).sum(1)).mean())  # the same as 2 - 2 cos
    assert isinstance(module.regressor[-1], torch.nn.BatchNorm1d) == bn
    assert module.regressor[0].out_features == module.teacher_dim


# ---------------------------------------------------------------------------------------------------- CRD
def test_crd_loss_against_a_direct_computation_with_fixed_negatives():
    module = make("crd", temperature=0.1, num_negatives=5)
    x, index = batch(4), torch.tensor([3, 0, 17, 31])
    neg = torch.tensor([[0, 1, 2, 4, 5], [1, 1, 9, 30, 31], [16, 18, 0, 0, 3], [30, 29, 1, 2, 7]])
    module.sample_negatives = lambda idx: neg  # injected: the negatives are fixed
    s_emb, t_emb = module.student(x), module.teacher(x)
    mem_s, mem_t = module.memory_student.clone(), module.memory_teacher.clone()
    loss, logs = module.distill(x, s_emb, t_emb, index=index)

    s = _normalise(module.embed_student(s_emb))
    t = _normalise(module.embed_teacher(t_emb))

    def nce(a, mem):  # one anchor at a time: -log softmax of the positive among [a·mem[i], a·mem[neg_i]] / T
        out = 0.0
        for i in range(a.shape[0]):
            rows = [int(index[i])] + neg[i].tolist()  # the positive: the memory row of the sample's own index
            logits = [float(a[i] @ mem[j]) / 0.1 for j in rows]
            out += -(logits[0] - math.log(sum(math.exp(v) for v in logits)))
        return out / a.shape[0]

    expected_s, expected_t = nce(s, mem_t), nce(t, mem_s)
    assert float(logs["loss_student_anchor"]) == pytest.approx(expected_s, rel=1e-5)
    assert float(logs["loss_teacher_anchor"]) == pytest.approx(expected_t, rel=1e-5)
    assert float(loss) == pytest.approx(expected_s + expected_t, rel=1e-5)

    # nothing written before the backward (autograd still needs the memory rows), then the momentum update by index
    torch.testing.assert_close(module.memory_student, mem_s)
    loss.backward()
    module.on_train_batch_end(None, None, 0)
    for mem, old, e in ((module.memory_student, mem_s, s), (module.memory_teacher, mem_t, t)):
        torch.testing.assert_close(mem[index], _normalise(0.5 * old[index] + 0.5 * e.detach()))
        rest = torch.ones(N, dtype=torch.bool)
        rest[index] = False
        torch.testing.assert_close(mem[rest], old[rest])


def test_crd_negatives_are_uniform_over_the_other_indices_and_injectable_by_generator():
    index = torch.tensor([0, 5, 9])
    neg = sample_negative_indices(index, 10, 20_000, torch.Generator().manual_seed(0))
    assert neg.shape == (3, 20_000) and neg.min() >= 0 and neg.max() < 10
    assert not (neg == index[:, None]).any()  # never the anchor's own index
    for row, own in zip(neg, index.tolist()):
        counts = torch.bincount(row, minlength=10).float()
        assert counts[own] == 0
        others = counts[torch.arange(10) != own]
        assert (others / 20_000 - 1 / 9).abs().max() < 0.015  # uniform over the 9 others
    again = sample_negative_indices(index, 10, 20_000, torch.Generator().manual_seed(0))
    assert torch.equal(neg, again)
    module = make("crd", generator=torch.Generator().manual_seed(3), num_negatives=7)
    assert module.sample_negatives(index).shape == (3, 7)


def test_crd_memory_update_with_a_repeated_index_keeps_the_last_occurrence():
    module = make("crd")
    old = module.memory_teacher.clone()
    e = _normalise(torch.randn(3, 128))
    module.stage_memory(torch.tensor([4, 7, 4]), e, e)
    module.flush_memory()
    torch.testing.assert_close(module.memory_teacher[4], F.normalize(0.5 * old[4] + 0.5 * e[2], dim=0))
    torch.testing.assert_close(module.memory_teacher[7], F.normalize(0.5 * old[7] + 0.5 * e[1], dim=0))


# ---------------------------------------------------------------------------------------------------- CC
def test_cc_loss_is_cross_entropy_of_the_cluster_id_of_each_index():
    module = make("cc", num_clusters=8)
    module.cluster_ids.copy_(torch.arange(N) % 8)
    x, index = batch(4), torch.tensor([9, 2, 31, 12])
    s = module.student(x)
    loss, _ = module.distill(x, s, None, index=index)
    logits = module.classifier(s)
    target = torch.tensor([9 % 8, 2, 31 % 8, 12 % 8])
    expected = -(logits.log_softmax(1)[torch.arange(4), target]).mean()
    torch.testing.assert_close(loss, expected)
    fresh = make("cc")
    with pytest.raises(RuntimeError, match="not computed"):
        fresh.distill(x, s, None, index=index)


def test_cc_clusters_are_the_teachers_kmeans_computed_once_and_restored_from_a_checkpoint(tmp_path, monkeypatch):
    module = make("cc", num_clusters=8)
    calls = []
    orig = ClusterClassification.compute_clusters

    def counting(self, feats):
        calls.append(feats.shape)
        return orig(self, feats)

    monkeypatch.setattr(ClusterClassification, "compute_clusters", counting)
    trainer = fit(module, 2, tmp_path)
    assert len(calls) == 1 and calls[0][0] == N
    # the teacher's k-means: L2-normalised embeddings of the train split under the evaluation transform
    with torch.no_grad():
        feats = F.normalize(module.teacher(Fixed(1).x), dim=1).numpy()
    expected = assign(feats, kmeans(feats, 8, niter=20, seed=0))
    assert np.array_equal(module.cluster_ids.numpy(), expected)
    assert module.cluster_ids.min() >= 0 and module.cluster_ids.max() < 8

    path = tmp_path / "cc.ckpt"
    trainer.save_checkpoint(path)
    sd = torch.load(path, weights_only=False)["state_dict"]
    assert torch.equal(sd["cluster_ids"], module.cluster_ids) and not any(k.startswith("teacher.") for k in sd)

    def forbidden(self, *a):
        raise AssertionError("the clusters were recomputed on resume")

    monkeypatch.setattr(ClusterClassification, "compute_clusters", forbidden)
    monkeypatch.setattr(ClusterClassification, "teacher_train_features", forbidden)
    fresh = make("cc", num_clusters=8, seed=1)
    fit(fresh, 4, tmp_path, ckpt_path=path)  # resumes at step 2 and trains 2 more steps
    assert torch.equal(fresh.cluster_ids, module.cluster_ids)


# ---------------------------------------------------------------------------------------------- Supervised
def test_supervised_loss_is_cross_entropy_on_the_labels():
    module = make("supervised")
    x, labels = batch(5), torch.tensor([0, 3, 1, 1, 2])
    s = module.student(x)
    loss, logs = module.distill(x, s, None, labels=labels, index=torch.arange(5))
    logits = module.classifier(s)
    expected = -(logits.log_softmax(1)[torch.arange(5), labels]).mean()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="labels"):
        module.distill(x, s, None)


# -------------------------------------------------------------------------------------------- all baselines
def test_memories_and_cluster_ids_are_persistent_buffers():
    crd, cc = make("crd"), make("cc")
    assert crd.state_dict()["memory_student"].shape == crd.state_dict()["memory_teacher"].shape == (N, 128)
    assert cc.state_dict()["cluster_ids"].shape == (N,)
    assert {"memory_student", "memory_teacher"} <= {n for n, _ in crd.named_buffers()}


BASELINES = ["regression", "regression_bn", "crd", "cc", "supervised"]


@pytest.mark.parametrize("method", BASELINES)
def test_each_baseline_trains_and_its_loss_decreases_on_a_fixed_batch(method, tmp_path, monkeypatch):
    module = make(method)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    heads = [{k: v.clone() for k, v in m.state_dict().items()} for m in module.extra_modules()]
    if not module.needs_teacher:  # Supervised and CC never run the teacher in a training step
        def no_teacher(*a, **k):
            raise AssertionError("the teacher was run")
        monkeypatch.setattr(module, "teacher_targets", no_teacher)
    rec = LossRecorder()
    fit(module, 30, tmp_path, callbacks=[rec])
    assert len(rec.losses) == 30 and all(math.isfinite(v) for v in rec.losses)
    early, late = sum(rec.losses[:3]) / 3, sum(rec.losses[-3:]) / 3
    assert late < 0.9 * early, (method, rec.losses)
    for m, before in zip(module.extra_modules(), heads):  # the heads are trained with the student
        assert any(not torch.equal(v, before[k]) for k, v in m.state_dict().items() if v.is_floating_point())
    module.teacher.assert_frozen()
    for k, v in module.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    # evaluation uses the student backbone's embedding only (the heads are dropped)
    assert module(batch(2)).shape == (2, module.student.embed_dim)


def _cfg(method, *extra):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=[f"method={method}", *extra])


@pytest.mark.parametrize("method", METHODS)
def test_build_method_dispatches_on_the_method_name(method):
    cfg = _cfg(method, "method.crd_dim=16", "method.crd_negatives=9")
    validate_train(cfg)
    student, teacher = nets()
    dm = SimpleNamespace(num_train=N, num_classes=CLASSES)
    module = build_method(cfg, student, teacher, dm)
    expected = {"regression": Regression, "regression_bn": Regression, "crd": CRD, "cc": ClusterClassification,
                "supervised": Supervised, "seed": SEED, "simreg": SimReg, "disco": DisCo}.get(method, CompReSS)
    assert type(module) is expected
    if method.startswith("regression"):
        assert isinstance(module.regressor[-1], torch.nn.BatchNorm1d) == (method == "regression_bn")
    if method == "crd":
        assert module.memory_teacher.shape == (N, 16) and module.num_negatives == 9
        assert (module.temperature, module.memory_momentum) == (0.07, 0.5)
    if method == "cc":
        assert module.num_clusters == min(10 * CLASSES, N) and module.cluster_ids.shape == (N,)
        assert build_method(_cfg("cc", "method.cc_clusters=5"), *nets(), dm).num_clusters == 5
    if method == "supervised":
        assert module.classifier.out_features == CLASSES


@pytest.mark.parametrize("override,key", [("method.crd_temperature=0", "method.crd_temperature"),
                                          ("method.crd_negatives=0", "method.crd_negatives"),
                                          ("method.crd_memory_momentum=1.0", "method.crd_memory_momentum"),
                                          ("method.cc_clusters=0", "method.cc_clusters")])
def test_bad_baseline_values_fail_naming_the_key(override, key):
    from compress_lit.runtime.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_train(_cfg("crd", override))
