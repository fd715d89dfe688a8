"""The self-supervised distillation family beside CompReSS (SEED, SimReg, DisCo): each loss against a direct float64
computation, the queues written after the backward pass, each method training on a fixed batch, the config keys
the papers vary, and the ImageNet presets under conf/experiment/family/."""
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from torch import nn
from torch.utils.data import DataLoader, Dataset

from compress_lit.runtime.config import ConfigError, OptimConfig, register_configs, validate_train
from compress_lit.losses import disco_loss, regression_loss, seed_loss
from compress_lit.methods import SEED, DisCo, SimReg
from compress_lit.methods.simreg import simreg_head
from compress_lit.models import build_backbone
from compress_lit.teachers import FrozenTeacher
from compress_lit.methods.build import METHOD_VIEWS, build_method, build_student

CONF = Path(__file__).resolve().parents[1] / "conf"
FAMILY = sorted(p.stem for p in (CONF / "experiment" / "family").glob("*.yaml"))
register_configs()
N = 16


def unit(v):
    return v / np.linalg.norm(v)


def log_softmax(z):
    return z - z.max() - np.log(np.exp(z - z.max()).sum())


def nets(seed=0):
    torch.manual_seed(0)
    teacher = FrozenTeacher(build_backbone("resnet18", small_input=True, width_multiplier=0.25))  # 128-d
    torch.manual_seed(seed)
    return build_backbone("resnet18", small_input=True, width_multiplier=0.125), teacher  # 64-d student


def optim(lr=0.05):
    return OmegaConf.structured(OptimConfig(lr=lr, epochs=1, scheduler="constant", milestones=[]))


def make(method, lr=0.05, **kw):
    student, teacher = nets()
    cls = {"seed": SEED, "simreg": SimReg, "disco": DisCo}[method]
    if method in ("seed", "disco"):
        kw.setdefault("queue_size", 64)
    if method == "disco":
        kw.setdefault("hidden_dim", 64)
    return cls(student, teacher, optim(lr), **kw)


def images(n=8, seed=1):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------ SEED
def _hand_seed(s, t, a, t_s, t_t):
    """mean_i −Σ_j p_t[i,j] log p_s[i,j], p over [own teacher embedding, queue] (float64)."""
    total = 0.0
    for i in range(s.shape[0]):
        us, ut = unit(s[i]), unit(t[i])
        zt = np.array([ut @ ut] + [ut @ a[j] for j in range(a.shape[0])]) / t_t
        zs = np.array([us @ ut] + [us @ a[j] for j in range(a.shape[0])]) / t_s
        total += -(np.exp(log_softmax(zt)) * log_softmax(zs)).sum()
    return total / s.shape[0]


@pytest.mark.parametrize("t_t", [0.5, 0.07])
def test_seed_loss_matches_hand_computation(t_t):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    a = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    got = seed_loss(s, t, a, student_temperature=0.2, teacher_temperature=t_t)
    want = _hand_seed(*(v.double().numpy() for v in (s, t, a)), 0.2, t_t)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_seed_at_the_official_teacher_temperature_is_cross_entropy_on_the_own_embedding():
    """At T_t = 1e-4 the teacher's softmax is one-hot on column 0 (t·t = 1 beats every anchor): the loss is the
    cross-entropy of the student's column 0."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    a = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    want = _hand_seed(*(v.double().numpy() for v in (s, t, a)), 0.2, 1e-4)
    us, ut = F.normalize(s.double(), dim=1), F.normalize(t.double(), dim=1)
    logits = torch.cat([(us * ut).sum(1, keepdim=True), us @ a.double().t()], 1) / 0.2
    ce = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)).item()
    assert seed_loss(s, t, a).item() == pytest.approx(want, rel=1e-5) == pytest.approx(ce, rel=1e-5)


def test_seed_scores_the_queue_before_the_batch_and_enqueues_the_teacher_after_the_backward():
    module = make("seed", queue_size=16, student_temperature=0.2, teacher_temperature=0.1)
    x = images(4)
    bank = module.queue.bank("teacher").clone()
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(16))  # SEED's queue starts normalised
    s, t = module.student(x), module.teacher(x)
    loss, _ = module.distill(x, s, t)
    torch.testing.assert_close(loss, seed_loss(module.head(s), t, bank, 0.2, 0.1))
    torch.testing.assert_close(module.queue.bank("teacher"), bank)  # nothing written before the backward
    loss.backward()
    module.on_train_batch_end(None, None, 0)
    torch.testing.assert_close(module.queue.bank("teacher")[:4], F.normalize(t, dim=1))
    torch.testing.assert_close(module.queue.bank("teacher")[4:], bank[4:])
    # SEED's head: Linear d->d, ReLU, Linear d->teacher width
    lin = [m for m in module.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(64, 64), (64, 128)]


# ---------------------------------------------------------------------------------------------------- SimReg
def official_simreg_mlp(d, out, n_layers):
    """UCDvision/simreg, written out: simreg.py's hidden_dims per --n_mlp_layers (2 and 4 only; anything else
    exits) and mlp_arch.get_mlp: Linear(h[i], h[i+1]), followed by BatchNorm1d + ReLU only when n_layers == 4 and
    i != 1, then Linear(h[-1], out)."""
    hidden = {2: [d, 2 * d], 4: [d, 2 * d, d, 2 * d]}[n_layers]
    layers = []
    for i in range(n_layers - 1):
        layers.append(("Linear", hidden[i], hidden[i + 1]))
        if i != 1 and n_layers == 4:
            layers += [("BatchNorm1d", None, None), ("ReLU", None, None)]
    return layers + [("Linear", hidden[-1], out)]


def test_simreg_head_layers_follow_the_official_mlp():
    def shape(head):
        return [(type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None)) for m in head]
    lin, bn, relu = "Linear", ("BatchNorm1d", None, None), ("ReLU", None, None)
    for depth in (2, 4):  # the official depths: n_mlp_layers 4 (run.sh) and 2
        assert shape(simreg_head(8, 5, depth)) == official_simreg_mlp(8, 5, depth)
    # depth 4: projection d->2d->d, then prediction d->2d->out, no BatchNorm/ReLU between the two heads
    assert shape(simreg_head(8, 5, 4)) == [(lin, 8, 16), bn, relu, (lin, 16, 8), (lin, 8, 16), bn, relu, (lin, 16, 5)]
    assert shape(simreg_head(8, 5, 2)) == [(lin, 8, 16), (lin, 16, 5)]  # official 2: nothing between the layers
    # no official counterpart (this library's): 1 is the Regression baseline's layer, 3 widens, normalises, narrows
    assert shape(simreg_head(8, 5, 1)) == [(lin, 8, 5)]
    assert shape(simreg_head(8, 5, 3)) == [(lin, 8, 16), bn, relu, (lin, 16, 8), (lin, 8, 5)]
    with pytest.raises(ValueError, match="depth"):
        simreg_head(8, 5, 0)


def test_simreg_loss_is_the_regression_of_a_hand_computed_head():
    module = make("simreg", head_depth=2)  # the official n_mlp_layers=2: two linear layers
    module.train()
    x = images(6)
    s, t = module.student(x), module.teacher(x)
    loss, logs = module.distill(x, s, t)
    l1, l2 = module.head
    pred = (s @ l1.weight.t() + l1.bias) @ l2.weight.t() + l2.bias
    p, q = F.normalize(pred, dim=1), F.normalize(t, dim=1)
    torch.testing.assert_close(loss, (2 - 2 * (p * q).sum(1)).mean())
    torch.testing.assert_close(loss, regression_loss(pred, t))
    torch.testing.assert_close(logs["cosine"], (p * q).sum(1).mean().detach())
    # depth 4 in train mode: BatchNorm with the batch's statistics after the widening layers
    module = make("simreg")
    module.train()
    l1, bn1, _, l2, l3, bn2, _, l4 = module.head
    h = s.detach() @ l1.weight.t() + l1.bias
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn1.eps) * bn1.weight + bn1.bias
    h = (torch.relu(h) @ l2.weight.t() + l2.bias) @ l3.weight.t() + l3.bias
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn2.eps) * bn2.weight + bn2.bias
    pred = torch.relu(h) @ l4.weight.t() + l4.bias
    loss, _ = module.distill(x, s.detach(), t)
    torch.testing.assert_close(loss, regression_loss(pred, t))


# ----------------------------------------------------------------------------------------------------- DisCo
def _hand_disco(q1, q2, k, queue, t1, t2, temp, w):
    nce = 0.0
    for i in range(q1.shape[0]):
        u = unit(q1[i])
        z = np.array([u @ k[i]] + [u @ queue[j] for j in range(queue.shape[0])]) / temp
        nce += -log_softmax(z)[0]
    nce /= q1.shape[0]
    cons = sum(np.mean([((unit(a[i]) - unit(b[i])) ** 2).sum() for i in range(a.shape[0])])
               for a, b in ((q1, t1), (q2, t2)))
    return nce + w * cons, nce, cons


@pytest.mark.parametrize("w", [1.0, 0.3])
def test_disco_loss_matches_hand_computation(w):
    g = torch.Generator().manual_seed(0)
    q1, q2, t1, t2 = (torch.randn(4, 6, generator=g) for _ in range(4))
    k = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    queue = F.normalize(torch.randn(9, 6, generator=g), dim=1)
    got = disco_loss(q1, q2, k, queue, t1, t2, temperature=0.2, weight=w)
    want = _hand_disco(*(v.double().numpy() for v in (q1, q2, k, queue, t1, t2)), 0.2, w)
    for a, b in zip(got, want):
        assert a.item() == pytest.approx(b, rel=1e-5)


def test_disco_step_contrasts_view1_with_the_momentum_key_of_view2_and_holds_both_views_to_the_teacher():
    module = make("disco", queue_size=16, momentum=0.9, bn_splits=1)  # one BatchNorm group: keys reproducible
    module.train()
    x1, x2 = images(4, seed=1), images(4, seed=2)
    bank = module.queue.bank("keys").clone()
    emb = module.training_embedding([x1, x2])
    t = module.teacher_targets([x1, x2], torch.arange(4))
    torch.testing.assert_close(t, torch.cat([module.teacher(x1), module.teacher(x2)]))  # the teacher sees both views
    loss, logs = module.distill([x1, x2], emb, t)
    with torch.no_grad():
        k = F.normalize(module.projector_momentum(module.student_momentum(x2)), dim=1)
    q = module.projector(emb)
    want = disco_loss(q[:4], q[4:], k, bank, t[:4], t[4:], 0.2, 32.0)
    torch.testing.assert_close(loss, want[0])
    torch.testing.assert_close(logs["consistency"], want[2].detach())
    before = [p.detach().clone() for p in module.student_momentum.parameters()]
    loss.backward()
    module.on_train_batch_end(None, None, 0)
    torch.testing.assert_close(module.queue.bank("keys")[:4], k)  # written after the backward
    torch.testing.assert_close(module.queue.bank("keys")[4:], bank[4:])
    for p_m, p_old, p_s in zip(module.student_momentum.parameters(), before, module.student.parameters()):
        torch.testing.assert_close(p_m, 0.9 * p_old + 0.1 * p_s.detach())  # EMA once per step
    with pytest.raises(ValueError, match="two augmented views"):
        module.training_embedding(x1)


def test_disco_keys_are_normalised_with_batchnorm_groups_other_than_their_queries():
    """Shuffled BatchNorm on one device: the key of a sample depends on which random group it lands in."""
    module = make("disco", bn_splits=2)
    module.train()
    x = images(8)
    torch.manual_seed(0)
    k1 = module.encode_keys(x)
    torch.manual_seed(1)
    k2 = module.encode_keys(x)
    assert not torch.allclose(k1, k2)  # other permutations, other group statistics
    assert module.bn_groups(64) == 2 and DisCo(*nets(), optim(), queue_size=8).bn_groups(256) == 8  # auto: batch // 32


def test_disco_default_weight_is_the_official_per_gpu_objective_under_ddp_gradient_averaging():
    """DisCo/main.py on each of 8 GPUs x 32 images: CrossEntropyLoss (mean) of [q·k, q·queue] / T plus
    MSELoss(reduction='sum') of the normalised teacher and student embeddings of each view; DDP averages the 8 GPUs'
    gradients of the shared weights. Our loss on the 256 images at the default weight (32) has the same value (the
    mean of the per-GPU losses) and the same gradient."""
    from compress_lit.losses.disco import DISCO_WEIGHT

    gpus, per_gpu, d_in, d, temp = 8, 32, 12, 16, 0.2
    g = torch.Generator().manual_seed(0)
    h1, h2 = torch.randn(gpus * per_gpu, d_in, generator=g), torch.randn(gpus * per_gpu, d_in, generator=g)
    t1, t2 = torch.randn(gpus * per_gpu, d, generator=g), torch.randn(gpus * per_gpu, d, generator=g)
    k = F.normalize(torch.randn(gpus * per_gpu, d, generator=g), dim=1)
    queue = F.normalize(torch.randn(64, d, generator=g), dim=1)  # one queue: every GPU scores the same one
    w0 = torch.randn(d_in, d, generator=g)  # the student's (shared) last layer: q = h @ W

    # the official computation, GPU by GPU
    ce, mse = nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")
    per_gpu_losses, per_gpu_grads = [], []
    for r in range(gpus):
        w = w0.clone().requires_grad_(True)  # each GPU's replica of the weights
        rows = slice(r * per_gpu, (r + 1) * per_gpu)
        q = F.normalize(h1[rows] @ w, dim=1)
        qk = F.normalize(h2[rows] @ w, dim=1)
        l_pos = torch.einsum("nc,nc->n", q, k[rows]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, queue.t())
        logits = torch.cat([l_pos, l_neg], dim=1) / temp
        labels = torch.zeros(per_gpu, dtype=torch.long)
        loss = ce(logits, labels) + mse(F.normalize(t1[rows], dim=1), q) + mse(F.normalize(t2[rows], dim=1), qk)
        (grad,) = torch.autograd.grad(loss, w)
        per_gpu_losses.append(loss.detach())
        per_gpu_grads.append(grad)
    ddp_loss = torch.stack(per_gpu_losses).mean()  # what the 8 GPUs report on average
    ddp_grad = torch.stack(per_gpu_grads).mean(0)  # DDP's all-reduce: the mean of the replicas' gradients

    w = w0.clone().requires_grad_(True)
    ours, nce, cons = disco_loss(h1 @ w, h2 @ w, k, queue, t1, t2, temperature=temp)  # the default weight
    assert DISCO_WEIGHT == 32.0 == gpus * per_gpu / gpus
    torch.testing.assert_close(ours, ddp_loss, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(ours, w)
    torch.testing.assert_close(grad, ddp_grad, rtol=1e-4, atol=1e-6)
    # weight 1 (the old default) is a different objective: the consistency 32x lighter
    one, _, _ = disco_loss(h1 @ w0, h2 @ w0, k, queue, t1, t2, temperature=temp, weight=1.0)
    assert one.item() == pytest.approx(nce.item() + cons.item(), rel=1e-6)
    assert ddp_loss.item() == pytest.approx(nce.item() + 32 * cons.item(), rel=1e-5)
    assert ddp_loss.item() > 5 * one.item()


def bn_buffers(module):
    return {k: v.clone() for k, v in module.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_disco_batch_teacher_normalises_each_view_group_by_group_as_the_official_train_mode_teacher():
    """teacher_bn=batch: the official teacher is in train mode, each view normalised with its GPU's batch; here each
    BatchNorm group (2 of 4 images) of each view, and the stored running statistics do not move."""
    import copy

    module = make("disco", teacher_bn="batch", bn_splits=2)
    module.train()
    x1, x2 = images(8, seed=1), images(8, seed=2)
    before = bn_buffers(module.teacher)
    assert len(before) == 3 * len(batch_norm_layers(module.teacher)) > 0
    official = copy.deepcopy(module.teacher.backbone).train()  # DisCo's teacher: model.train() reaches it
    with torch.no_grad():
        want = torch.cat([official(v[i:i + 4]) for v in (x1, x2) for i in (0, 4)])
    t = module.teacher_targets([x1, x2], torch.arange(8))
    torch.testing.assert_close(t, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(t, torch.cat([module.teacher(x1), module.teacher(x2)]), atol=1e-3)  # not eval mode
    # a whole step: the loss, its backward, the queue and EMA updates
    emb = module.training_embedding([x1, x2])
    loss, _ = module.distill([x1, x2], emb, t)
    loss.backward()
    module.on_train_batch_end(None, None, 0)
    after = bn_buffers(module.teacher)
    assert after.keys() == before.keys()
    for k, v in before.items():  # running_mean, running_var and num_batches_tracked exactly as loaded
        assert torch.equal(after[k], v), k
    module.teacher.assert_frozen()  # back in eval mode, no parameter requires grad
    assert not t.requires_grad and all(p.grad is None for p in module.teacher.parameters())
    # the default (eval) is the teacher's running statistics, both views in one forward
    default = make("disco", bn_splits=2)
    torch.testing.assert_close(default.teacher_targets([x1, x2], torch.arange(8)),
                               torch.cat([default.teacher(x1), default.teacher(x2)]))
    with pytest.raises(ValueError, match="teacher_bn"):
        make("disco", teacher_bn="train")


def batch_norm_layers(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ------------------------------------------------------------------------------------------ training loops
class Fixed(Dataset):
    """The same N images (two fixed views each for DisCo) at every step."""

    def __init__(self, views, steps=40):
        self.x = images(N, seed=0)
        self.views, self.steps = views, steps

    def __len__(self):
        return N * self.steps

    def __getitem__(self, i):
        x = self.x[i % N]
        return ([x, x.flip(-1)] if self.views == 2 else x), 0, i % N


def spread(teacher, x):
    """A random teacher in eval mode maps every image to nearly one direction (pairwise cosine 0.96 here), which
    leaves little to distil: its BatchNorm statistics are set from the fixed images themselves (cosine 0.76)."""
    norms = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one pass gives the statistics of x
    teacher.backbone.train()
    with torch.no_grad():
        teacher.backbone(x)
    teacher.backbone.eval()


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("method", ["seed", "simreg", "disco", "disco_batch_teacher"])
def test_each_family_method_trains_and_its_loss_decreases_on_a_fixed_batch(method, tmp_path):
    # SEED's queue: one batch, so that it holds one copy of each image besides the image's own column
    kw = {"seed": {"queue_size": N}, "disco_batch_teacher": {"teacher_bn": "batch"}}.get(method, {})
    method = method.split("_")[0]
    module = make(method, **kw)
    spread(module.teacher, Fixed(1).x)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    heads = [{k: v.clone() for k, v in m.state_dict().items()} for m in module.extra_modules()]
    rec = LossRecorder()
    trainer = pl.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[rec])
    views = METHOD_VIEWS.get(method, 1)
    trainer.fit(module, DataLoader(Fixed(views), batch_size=N, shuffle=False))
    assert len(rec.losses) == 30 and all(math.isfinite(v) for v in rec.losses)
    # (SEED, DisCo: the first steps score a queue of random vectors, easier negatives than the real keys that
    # follow, so the early window is if anything low)
    early, late = sum(rec.losses[:3]) / 3, sum(rec.losses[-3:]) / 3
    assert late < 0.9 * early, (method, rec.losses)
    for m, before in zip(module.extra_modules(), heads):  # the heads are trained with the student
        assert any(not torch.equal(v, before[k]) for k, v in m.state_dict().items() if v.is_floating_point())
    module.teacher.assert_frozen()
    for k, v in module.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert module(images(2)).shape == (2, module.student.embed_dim)  # evaluation: the backbone alone


# ---------------------------------------------------------------------------------------- configs, presets
def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_method_configs_carry_the_official_defaults_and_build_their_modules():
    dm = SimpleNamespace(num_train=N, num_classes=4)
    seed = build_method(_cfg("method=seed", "method.queue_size=32"), *nets(), dm)
    assert type(seed) is SEED and (seed.teacher_temperature, seed.student_temperature) == (1e-4, 0.2)
    simreg = build_method(_cfg("method=simreg"), *nets(), dm)
    assert type(simreg) is SimReg and simreg.head_depth == 4
    disco = build_method(_cfg("method=disco", "method.queue_size=32"), *nets(), dm)
    assert type(disco) is DisCo and (disco.temperature, disco.momentum, disco.weight) == (0.2, 0.999, 32.0)
    assert disco.teacher_bn == "eval"  # the library's teacher; the family/disco_* presets set the official batch
    assert disco.projector[0].out_features == 2048 and disco.projector[-1].out_features == disco.teacher_dim
    m = OmegaConf.load(CONF / "method" / "seed.yaml")  # (data=digits, the default, shrinks every queue to 1024)
    assert (m.queue_size, m.temperature, m.student_temperature) == (65536, 1e-4, 0.2)
    assert OmegaConf.load(CONF / "method" / "disco.yaml").queue_size == 65536 and METHOD_VIEWS == {"disco": 2}


@pytest.mark.parametrize("override,attr,value", [
    ("method.temperature=0.01", "teacher_temperature", 0.01),  # SEED's teacher temperature
    ("method.simreg_head_depth=2", "head_depth", 2),
    ("method.disco_weight=0.5", "weight", 0.5),
])
def test_the_papers_ablation_knobs_are_plain_config_keys(override, attr, value):
    name = {"teacher_temperature": "seed", "head_depth": "simreg", "weight": "disco"}[attr]
    cfg = _cfg(f"method={name}", "method.queue_size=32", override)
    validate_train(cfg)
    assert getattr(build_method(cfg, *nets()), attr) == value


@pytest.mark.parametrize("overrides,key", [
    (["method=simreg", "method.simreg_head_depth=0"], "method.simreg_head_depth"),
    (["method=disco", "method.disco_weight=-1"], "method.disco_weight"),
    (["method=disco", "teacher.cached=true"], "teacher.cached"),
    (["method=disco", "method.disco_bn_splits=200"], "method.disco_bn_splits"),
    (["method=disco", "method.disco_teacher_bn=train"], "method.disco_teacher_bn"),
    (["method=disco", "method.disco_teacher_bn=batch", "+trainer.sync_batchnorm=true"], "method.disco_teacher_bn"),
    (["method=seed", "method.temperature=0"], "method.temperature"),
])
def test_bad_family_values_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_train(_cfg(*overrides))


# the papers' settings, per preset: method, teacher arch, student, lr, epochs, augmentation
PRESET_SETTINGS = {
    "seed": ("resnet50", 0.03, 200, "mocov2"),
    "simreg": (None, 0.05, 130, "crop_flip"),
    "disco": ("resnet50", 0.03, 200, "mocov2"),
}


def test_the_family_presets_cover_each_papers_headline_students():
    want = {f"{m}_mocov2_r50_to_{s}" for m in ("seed", "disco")
            for s in ("resnet18", "efficientnet_b0", "mobilenetv3")}
    want |= {"simreg_mocov2_r50_to_resnet18", "simreg_mocov2_r50_to_mobilenetv2", "simreg_simclr_r50x4_to_resnet50"}
    assert set(FAMILY) == want


class StandIn(nn.Module):
    """A cheap teacher of the preset teacher's width (building a ResNet-50x4 takes longer than this test)."""

    def __init__(self, arch):
        super().__init__()
        self.embed_dim = {"resnet50": 2048, "resnet50x4": 8192}[arch]
        self.fc = nn.Linear(3, self.embed_dim)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("preset", FAMILY)
def test_family_preset_composes_with_its_papers_settings_and_runs(preset):
    student = OmegaConf.load(CONF / "experiment" / "family" / f"{preset}.yaml").defaults[1]["override /student"]
    if not (CONF / "student" / f"{student}.yaml").exists():
        pytest.skip(f"student={student} is not in conf/student yet")
    cfg = _cfg(f"experiment=family/{preset}", "teacher.checkpoint=/ckpt/t.pth", "data.root=/data/imagenet")
    validate_train(cfg)
    method = preset.split("_")[0]
    teacher_arch, lr, epochs, augment = PRESET_SETTINGS[method]
    o, d = cfg.optim, cfg.data
    assert cfg.method.name == method and cfg.student.name == student
    assert (o.lr, o.epochs, o.scheduler, o.momentum, o.weight_decay, o.warmup_epochs) == \
        (lr, epochs, "cosine", 0.9, 1e-4, 0)
    assert (d.name, d.batch_size, list(d.crop_scale), d.augment, d.root) == \
        ("imagefolder", 256, [0.2, 1.0], augment, "/data/imagenet")
    assert teacher_arch is None or cfg.teacher.arch == teacher_arch
    if method == "disco":  # DisCo/main.py: MSELoss(reduction='sum') over 32 images per GPU; a train-mode teacher
        assert (cfg.method.disco_weight, cfg.method.disco_teacher_bn) == (32.0, "batch")
    assert cfg.student.train_head_dim is None
    with open_dict(cfg):
        cfg.method.queue_size = 64  # the papers' 65,536 x 2,048 queue would not fit a test
    torch.manual_seed(0)
    module = build_method(cfg, build_student(cfg.student), FrozenTeacher(StandIn(cfg.teacher.arch)))
    if method == "disco":
        assert (module.weight, module.teacher_bn) == (32.0, "batch")
    x = torch.randn(2, 3, 64, 64)
    x = [x, x.flip(-1)] if method == "disco" else x
    loss, _ = module.distill(x, module.training_embedding(x), module.teacher_targets(x, torch.arange(2)))
    assert torch.isfinite(loss)


def test_every_loss_lives_in_compress_lit_losses():
    import compress_lit.losses.compress as old
    import compress_lit.losses as losses
    from compress_lit.methods import baselines

    assert old.compress_loss is losses.compress_loss and old.CompReSSLoss is losses.CompReSSLoss
    assert baselines.regression_loss is losses.regression_loss and baselines.crd_info_nce is losses.crd_info_nce


def test_momentum_is_used_by_disco_and_reported_unused_for_seed_and_simreg():
    from compress_lit.runtime.config import warn_unused_settings

    assert warn_unused_settings(_cfg("method=disco", "method.momentum=0.99")) == []
    for method in ("seed", "simreg"):
        (msg,) = warn_unused_settings(_cfg(f"method={method}", "method.momentum=0.99"))
        assert f"is ignored: method={method} has no momentum student" in msg
