"""Feature extraction: order, layers and pooling, frozen eval mode, DDP shard merging, the disk cache."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from compress_lit.evaluation.features import (FeatureCache, extract_features, feature_cache_key, merge_shards,
                                              describe_loader)
from compress_lit.models import build_backbone


def _ds(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 4, torch.arange(n))


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * 8 * 8, 5)
        self.bn = nn.BatchNorm1d(5)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.bn(self.lin(x.flatten(1)))


def test_features_in_dataset_order_and_model_frozen():
    ds = _ds()
    m = Counting()
    m.train()
    bn_before = m.bn.running_mean.clone()
    shuffled = DataLoader(ds, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(1))
    f, y = extract_features(m, shuffled)
    with torch.no_grad():
        m.eval()
        expect = m(ds.tensors[0])
    assert torch.allclose(f, expect, atol=1e-6) and torch.equal(y, ds.tensors[1])
    assert torch.equal(m.bn.running_mean, bn_before)  # BatchNorm ran in eval mode
    m.train()
    m.bn.eval()  # mixed modes are restored module by module
    extract_features(m, DataLoader(ds, batch_size=8))
    assert m.training and m.lin.training and not m.bn.training


def test_layers_are_pooled_and_validated():
    loader = DataLoader(_ds(6), batch_size=4)
    alex = build_backbone("alexnet", small_input=True, width_multiplier=0.125, fc_dim=32)
    f, _ = extract_features(alex, loader, layer="conv5")
    assert f.shape == (6, 32)  # 256 * 0.125 channels, spatially averaged
    x = torch.stack([loader.dataset[i][0] for i in range(6)])
    with torch.no_grad():
        alex.eval()
        expect = alex.forward_features(x, ("conv5",))["conv5"].mean((2, 3))
    assert torch.allclose(f, expect, atol=1e-5)
    assert extract_features(alex, loader, layer="fc6")[0].shape == (6, 32)
    assert torch.allclose(extract_features(alex, loader, layer="fc7")[0], extract_features(alex, loader)[0])
    res = build_backbone("resnet18", small_input=True, width_multiplier=0.125)
    assert extract_features(res, loader, layer="layer3")[0].shape == (6, 32)
    with pytest.raises(ValueError):
        extract_features(res, loader, layer="fc7")


def test_merge_shards_matches_distributed_sampler_padding():
    ds = _ds(23)
    m = Counting()
    single, ys = extract_features(m, DataLoader(ds, batch_size=4))
    world = 4  # 23 samples -> 6 per rank, one index padded
    raw = []
    for rank in range(world):
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=3)
        captured = []

        def capture(t, captured=captured):
            captured.append(t)
            return t

        extract_features(m, DataLoader(ds, batch_size=4, sampler=sampler), gather=capture)
        raw.append(captured)  # [features, labels, indices] of this rank, in sampler order
    assert sum(len(r[2]) for r in raw) == 24
    f = torch.cat([r[0] for r in raw])
    y = torch.cat([r[1] for r in raw])
    idx = torch.cat([r[2] for r in raw])
    mf, my = merge_shards(f, y, idx)
    assert torch.allclose(mf, single, atol=1e-6) and torch.equal(my, ys)
    # the same through extract_features' gather: rank 0 gathers everybody's shards
    others = iter([torch.cat([r[i] for r in raw[1:]]) for i in range(3)])
    sampler0 = DistributedSampler(ds, num_replicas=world, rank=0, shuffle=True, seed=3)
    g, gy = extract_features(m, DataLoader(ds, batch_size=4, sampler=sampler0),
                             gather=lambda t: torch.cat([t, next(others)]))
    assert torch.allclose(g, single, atol=1e-6) and torch.equal(gy, ys)


def test_cache_skips_the_model_and_keys_change(tmp_path):
    ds = _ds()
    loader = DataLoader(ds, batch_size=8)
    m = Counting()
    key = feature_cache_key("ckpt-a", None, "train", **describe_loader(loader))
    f1, y1 = extract_features(m, loader, cache=tmp_path, cache_key=key)
    assert m.calls == 3
    f2, y2 = extract_features(m, loader, cache=FeatureCache(tmp_path), cache_key=key)
    assert m.calls == 3  # second call: read from disk, model not run
    assert torch.equal(f1, f2) and torch.equal(y1, y2)
    keys = {key,
            feature_cache_key("ckpt-a", "conv5", "train", **describe_loader(loader)),
            feature_cache_key("ckpt-a", None, "val", **describe_loader(loader)),
            feature_cache_key("ckpt-b", None, "train", **describe_loader(loader)),
            feature_cache_key("ckpt-a", None, "train", transform="Resize(256)", n=23)}
    assert len(keys) == 5
    assert feature_cache_key("ckpt-a", None, "train", **describe_loader(loader)) == key  # stable
    # a checkpoint file that is rewritten gets a new key
    ck = tmp_path / "model.ckpt"
    ck.write_bytes(b"1")
    k1 = feature_cache_key(ck, None, "train")
    ck.write_bytes(b"22")
    assert feature_cache_key(ck, None, "train") != k1
    # a different key recomputes
    extract_features(m, loader, cache=tmp_path, cache_key=feature_cache_key("ckpt-a", None, "val"))
    assert m.calls == 6
    # a corrupt file is recomputed, not trusted
    FeatureCache(tmp_path).path(key).write_bytes(b"garbage")
    extract_features(m, loader, cache=tmp_path, cache_key=key)
    assert m.calls == 9
