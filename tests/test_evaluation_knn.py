"""k-NN: hand-derivable accuracies, tie-break, weighted vote, top-5, faiss vs torch, fallback, chunking."""
import math

import numpy as np
import pytest
import torch

from compress_lit.evaluation import knn as knn_mod
from compress_lit.evaluation.knn import knn_accuracy, knn_evaluate, knn_predict, knn_search


def _unit(deg):
    r = np.deg2rad(np.asarray(deg, dtype=np.float64))
    return torch.tensor(np.stack([np.cos(r), np.sin(r)], 1), dtype=torch.float32)


def _ring():
    """4 classes centred at 0/90/180/270 degrees, 3 points each at centre-10, centre, centre+10."""
    centres = [0, 90, 180, 270]
    deg = [c + o for c in centres for o in (-10, 0, 10)]
    labels = torch.tensor([i for i in range(4) for _ in range(3)])
    return _unit(deg), labels, centres


def test_knn_hand_derived_accuracy():
    bank, labels, centres = _ring()
    # queries 20 degrees past each centre: the nearest bank point is centre+10 (10 deg away), the next class's
    # nearest point is centre+80 (60 deg away) -> 1-NN predicts the centre's class
    q = _unit([c + 20 for c in centres] * 2)
    truth = torch.tensor([0, 1, 2, 3] + [1, 2, 3, 0])  # second half labelled with the next class: wrong
    assert knn_predict(bank, labels, q, k=1).tolist() == [0, 1, 2, 3] * 2
    assert knn_accuracy(bank, labels, q, truth, k=1) == pytest.approx(50.0)
    # k=3: the three nearest are centre+10, centre, centre-10 (all the same class) -> same predictions
    assert knn_accuracy(bank, labels, q, truth, k=3) == pytest.approx(50.0)
    # scaling the features changes nothing (cosine on L2-normalised features)
    assert knn_accuracy(bank * 7.0, labels, q * 0.01, truth, k=1) == pytest.approx(50.0)


def test_majority_tie_goes_to_nearest_class_and_distance_weighting():
    # query at 0 deg; class 0 at 8 deg (cos 0.990), class 1 at +-60 deg (cos 0.5), class 2 far away
    bank = _unit([8, 60, -60, 180, 170])
    labels = torch.tensor([0, 1, 1, 2, 2])
    q = _unit([0])
    # k=3: votes class1 = 2, class0 = 1 -> majority says 1
    assert knn_predict(bank, labels, q, k=3).item() == 1
    # distance weighting exp(sim / 0.07): class 0 weighs exp(0.990/0.07) >> 2 exp(0.5/0.07)
    assert knn_predict(bank, labels, q, k=3, weighting="distance").item() == 0
    # tie 1 vs 1 (k=2: class 0 at rank 1, class 1 at rank 2) -> the class whose nearest member ranks first
    assert knn_predict(bank, labels, q, k=2).item() == 0
    bank2 = _unit([8, 20, 60])
    assert knn_predict(bank2, torch.tensor([5, 3, 3]), q, k=3, num_classes=6).item() == 3  # 2 votes beat 1
    assert knn_predict(bank2, torch.tensor([5, 3, 4]), q, k=3, num_classes=6).item() == 5  # 1-1-1 tie -> rank 1


def _reference_rankings(bank, labels, queries, k, num_classes, weighting="majority", t=0.07):
    """Independent brute force: numpy cosine, full argsort, python vote with (score, -first rank, -class)."""
    b = bank.numpy().astype(np.float64)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    out = []
    for q in queries.numpy().astype(np.float64):
        q = q / np.linalg.norm(q)
        sims = b @ q
        order = sorted(range(len(sims)), key=lambda i: (-sims[i], i))[:k]
        score, first = {}, {}
        for r, i in enumerate(order):
            c = int(labels[i])
            score[c] = score.get(c, 0.0) + (1.0 if weighting == "majority" else math.exp((sims[i] - 1) / t))
            first.setdefault(c, r)
        ranked = sorted(range(num_classes), key=lambda c: (-score.get(c, 0.0), first.get(c, k), c))
        out.append(ranked)
    return np.array(out)


def _blobs(n_per, n_cls, dim, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_cls, dim, generator=g) * 2
    x = centres.repeat_interleave(n_per, 0) + spread * torch.randn(n_per * n_cls, dim, generator=g)
    return x, torch.arange(n_cls).repeat_interleave(n_per)


@pytest.mark.parametrize("weighting", ["majority", "distance"])
def test_top1_top5_match_brute_force(weighting):
    bank, by = _blobs(30, 8, 16, 0, spread=2.0)
    q, qy = _blobs(10, 8, 16, 0, spread=2.0)
    q = q + 0.3 * torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    ref = _reference_rankings(bank, by, q, 20, 8, weighting)
    res = knn_evaluate(bank, by, q, qy, ks=[20], weighting=weighting, backend="torch")
    assert res["top1_k20"] == pytest.approx(100 * np.mean(ref[:, 0] == qy.numpy()))
    assert res["top5_k20"] == pytest.approx(100 * np.mean((ref[:, :5] == qy.numpy()[:, None]).any(1)))
    assert knn_predict(bank, by, q, k=20, weighting=weighting, topk=5).numpy().tolist() == ref[:, :5].tolist()
    assert 0 < res["top1_k20"] < res["top5_k20"] <= 100


def test_top5_only_with_more_than_5_classes():
    bank, by = _blobs(10, 5, 8, 1)
    res = knn_evaluate(bank, by, bank, by, ks=[1, 20])
    assert set(res) == {"top1_k1", "top1_k20"}
    assert res["top1_k1"] == 100.0  # each query is in the bank


def test_faiss_and_torch_agree_exactly():
    pytest.importorskip("faiss")
    bank, by = _blobs(200, 10, 64, 2, spread=3.0)
    q, qy = _blobs(50, 10, 64, 3, spread=3.0)
    for k in (1, 20):
        sf, i_f = knn_search(bank, q, k, backend="faiss")
        st, i_t = knn_search(bank, q, k, backend="torch")
        assert torch.equal(i_f, i_t)
        assert torch.equal(sf, st)
        for w in ("majority", "distance"):
            pf = knn_predict(bank, by, q, k=k, backend="faiss", weighting=w)
            pt = knn_predict(bank, by, q, k=k, backend="torch", weighting=w)
            assert torch.equal(pf, pt)
    assert knn_evaluate(bank, by, q, qy, backend="faiss") == knn_evaluate(bank, by, q, qy, backend="torch")


def test_torch_fallback_when_faiss_missing(monkeypatch):
    def missing():
        raise ImportError("no faiss")

    monkeypatch.setattr(knn_mod, "_faiss", missing)
    assert knn_mod.resolve_backend("auto") == "torch"
    with pytest.raises(ImportError):
        knn_mod.resolve_backend("faiss")
    bank, labels, centres = _ring()
    assert knn_predict(bank, labels, _unit(centres), k=1).tolist() == [0, 1, 2, 3]


def test_chunked_search_equals_unchunked():
    bank, by = _blobs(100, 6, 12, 4)
    q, _ = _blobs(13, 6, 12, 5)
    s1, i1 = knn_search(bank, q, 15, backend="torch", chunk=4096, bank_chunk=1 << 20)
    s2, i2 = knn_search(bank, q, 15, backend="torch", chunk=7, bank_chunk=33)
    assert torch.equal(i1, i2) and torch.allclose(s1, s2)
    # k larger than the bank: capped
    s3, i3 = knn_search(bank[:5], q, 20, backend="torch")
    assert i3.shape == (q.shape[0], 5)


def test_invalid_arguments():
    bank, labels, _ = _ring()
    with pytest.raises(ValueError):
        knn_predict(bank, labels, bank, k=0)
    with pytest.raises(ValueError):
        knn_predict(bank, labels, bank, k=1, weighting="nope")
    with pytest.raises(ValueError):
        knn_mod.resolve_backend("gpu")
