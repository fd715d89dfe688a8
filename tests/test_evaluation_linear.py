"""Linear probe: the head, train-only standardisation, separable features, the Lightning module."""
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compress_lit.evaluation.linear import (BEST_LABEL, LinearHead, LinearProbe, linear_probe_on_features,
                                            run_linear_probe, standardization_stats)
from compress_lit.evaluation.settings import LinearProbeConfig


def _separable(n_per, n_cls, dim, seed, centre_seed=0):
    centres = F.normalize(torch.randn(n_cls, dim, generator=torch.Generator().manual_seed(centre_seed)), dim=1) * 4
    g = torch.Generator().manual_seed(seed + 1000)
    y = torch.arange(n_cls).repeat_interleave(n_per)
    return centres[y] + 0.3 * torch.randn(len(y), dim, generator=g), y


def test_head_normalises_then_standardises():
    x = torch.randn(5, 4) * 3
    mean, std = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1.0, 2.0, 0.5, 4.0])
    head = LinearHead(4, 3, mean, std)
    expect = head.fc((F.normalize(x, dim=1) - mean) / std)
    assert torch.allclose(head(x), expect)
    assert torch.allclose(head(x * 10), expect, atol=1e-6)  # scale invariant (L2 first)


def test_standardisation_uses_train_statistics_only():
    tx, ty = _separable(50, 4, 16, 0)
    vx, vy = _separable(20, 4, 16, 1)
    z = F.normalize(tx, dim=1).double()
    mean, std = standardization_stats(tx)
    assert torch.allclose(mean.double(), z.mean(0), atol=1e-6)
    # the official head's scale: 1 / sqrt(unbiased var + 1e-5), written out by hand
    n = z.shape[0]
    var = ((z - z.mean(0)) ** 2).sum(0) / (n - 1)
    assert torch.allclose(std.double(), torch.sqrt(var + 1e-5), atol=1e-6)
    a = linear_probe_on_features(tx, ty, vx, vy, epochs=2)
    b = linear_probe_on_features(tx, ty, vx * 100 + 7, vy, epochs=2)  # very different test features
    assert torch.equal(a["mean"], b["mean"]) and torch.equal(a["std"], b["std"])
    assert torch.allclose(a["mean"], mean) and torch.equal(a["head"].mean, a["mean"])
    # a constant dimension (var 0: a dead ReLU unit) is scaled by 1/sqrt(1e-5) = 316, as the official head does
    tx2 = tx.clone()
    tx2[:, 3] = 0.0
    _, std2 = standardization_stats(tx2)
    assert torch.isclose(1 / std2[3], torch.tensor(316.2278), rtol=1e-5) and torch.isfinite(std2).all()
    # a rarely active unit (one sample in 50 at 1e-4 after normalisation): scale near 316, not 1/std ~ 7e4
    tx3 = tx2.clone()
    tx3[0, 3] = 1e-4 * tx3[0].norm()
    _, std3 = standardization_stats(tx3)
    assert 300 < 1 / float(std3[3]) < 316.3


def test_separable_features_reach_99_percent_with_the_paper_schedule():
    tx, ty = _separable(200, 10, 32, 2)
    vx, vy = _separable(50, 10, 32, 3)
    res = linear_probe_on_features(tx, ty, vx, vy)  # lr 0.01, momentum 0.9, wd 1e-4, 40 epochs, batch 256
    assert res["epochs"] == 40 and len(res["history"]) == 40
    assert res["top1"] >= 99.0
    assert res["top1"] == res["history"][-1]
    assert res[BEST_LABEL]["top1"] == max(res["history"])
    assert res["top5"] >= res["top1"]
    # deterministic for a seed
    again = linear_probe_on_features(tx, ty, vx, vy, epochs=3)
    assert again["history"] == linear_probe_on_features(tx, ty, vx, vy, epochs=3)["history"]


def test_schedule_decays_at_milestones():
    from compress_lit.evaluation.linear import _schedule

    s = _schedule(LinearProbeConfig())
    assert [s(e) for e in (0, 14, 15, 29, 30, 39)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


class _Backbone(nn.Module):
    """A tiny frozen 'network' with BatchNorm (to check it stays in eval mode) and two layers."""

    layer_names = ("conv", "pool")

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.embed_dim = 8

    def forward_features(self, x, layers=("pool",)):
        f = torch.relu(self.bn(self.conv(x)))
        out = {}
        if "conv" in layers:
            out["conv"] = f
        if "pool" in layers:
            out["pool"] = f.mean((2, 3))
        return out

    def forward(self, x):
        return self.forward_features(x)["pool"]


class _DM(pl.LightningDataModule):
    def __init__(self, n=64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        y = torch.arange(n) % 2
        x = torch.randn(n, 1, 6, 6, generator=g) + (y * 2.0 - 1.0).view(-1, 1, 1, 1)
        self.ds = TensorDataset(x, y, torch.arange(n))
        self.num_classes = 2

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.ds, batch_size=32)

    def train_eval_dataloader(self):
        return DataLoader(self.ds, batch_size=32)


def test_lightning_probe_keeps_backbone_frozen_and_reports_final_epoch(tmp_path):
    torch.manual_seed(0)
    bb = _Backbone()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    dm = _DM()
    cfg = LinearProbeConfig(epochs=3, milestones=[2], lr=0.1, batch_size=16)
    res = run_linear_probe(bb, None, cfg, datamodule=dm, default_root_dir=str(tmp_path),
                           trainer_kwargs={"accelerator": "cpu", "devices": 1})
    after = bb.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats untouched
    assert res["epochs"] == 3 and len(res["history"]) == 3 and res["top1"] == res["history"][-1]
    assert res[BEST_LABEL]["top1"] == max(res["history"])
    assert res["top1"] > 90.0  # the two classes are shifted by +-1 per pixel
    # any layer: spatial maps are average-pooled, globally (pooled_dim=None) or to ~pooled_dim numbers (the
    # default 9216: 8 channels x 34 x 34 wanted, the 6 x 6 map is not upsampled -> 8 x 6 x 6 = 288)
    from dataclasses import replace

    mean, std = torch.zeros(8), torch.ones(8)
    probe = LinearProbe(bb, 2, mean, std, replace(cfg, pooled_dim=None), layer="conv")
    probe.train()
    assert not bb.training and not bb.bn.training and probe.head.training
    assert probe(torch.randn(3, 1, 6, 6)).shape == (3, 2)
    probe = LinearProbe(bb, 2, torch.zeros(288), torch.ones(288), cfg, layer="conv")
    assert probe(torch.randn(3, 1, 6, 6)).shape == (3, 2) and probe.head.fc.in_features == 288
    assert all(not p.requires_grad for p in bb.parameters())
