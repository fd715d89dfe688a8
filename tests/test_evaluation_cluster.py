"""Cluster alignment: overlap matrix, similarity, Hungarian mapping, accuracy, seeds, pictures."""
import numpy as np
import pytest
import torch
from PIL import Image

from compress_lit.evaluation.cluster import (align, assign, cluster_alignment, cluster_class_similarity,
                                             hungarian_mapping, kmeans, mapped_accuracy, overlap_matrix,
                                             plot_cluster_grid, plot_confusion)


def test_overlap_matrix_equals_brute_force_count():
    rng = np.random.default_rng(0)
    c, y = rng.integers(0, 13, 2000), rng.integers(0, 7, 2000)
    brute = np.zeros((13, 7), dtype=np.int64)
    for i in range(13):
        for j in range(7):
            brute[i, j] = len(set(np.flatnonzero(c == i)) & set(np.flatnonzero(y == j)))
    ov = overlap_matrix(c, y, 13, 7)
    assert ov.dtype == np.int64 and np.array_equal(ov, brute)
    assert np.array_equal(overlap_matrix(torch.as_tensor(c), torch.as_tensor(y), 13, 7), brute)
    with pytest.raises(ValueError):
        overlap_matrix([0, 13], [0, 0], 13, 7)


def test_permuted_labels_align_perfectly():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 10, 500)
    perm = rng.permutation(10)
    clusters = perm[y]  # cluster ids are a relabelling of the classes
    res = align(clusters, y, clusters, y, 10, 10)
    assert res["acc"] == 100.0
    assert np.array_equal(res["mapping"][perm], np.arange(10))


def _blobs(n_classes, n, g):
    centres = torch.nn.functional.normalize(torch.randn(n_classes, 32, generator=g), dim=1) * 10
    y = torch.arange(n_classes).repeat_interleave(n)
    return centres, lambda m: (centres[torch.arange(n_classes).repeat_interleave(m)]
                               + 0.05 * torch.randn(n_classes * m, 32, generator=g),
                               torch.arange(n_classes).repeat_interleave(m))


def test_end_to_end_on_separated_blobs():
    g = torch.Generator().manual_seed(0)
    # two far-apart blobs: Lloyd's iterations always separate them, whatever the seed -> 100% with permuted labels
    _, draw = _blobs(2, 0, g)
    (tx, ty), (vx, vy) = draw(40), draw(10)
    res = cluster_alignment(tx, 1 - ty, vx, 1 - vy, seeds=3)
    s = res.summary()
    assert s["acc_per_seed"] == [100.0, 100.0, 100.0] and s["acc_std"] == 0.0
    assert s["nmi_mean"] == pytest.approx(1.0) and s["ari_mean"] == pytest.approx(1.0)
    # six blobs: with faiss' random initialisation a seed usually ends in a local minimum (two centroids in one
    # blob); accuracy is 100% exactly when the clustering is perfect (NMI 1), and mean/std summarise the seeds
    _, draw = _blobs(6, 0, g)
    (tx, ty), (vx, vy) = draw(40), draw(10)
    perm = torch.tensor([3, 5, 0, 1, 4, 2])
    s = cluster_alignment(tx, perm[ty], vx, perm[vy], seeds=5).summary()
    for acc, nmi in zip(s["acc_per_seed"], s["nmi_per_seed"]):
        assert (acc == 100.0) == (nmi == pytest.approx(1.0))
    assert s["acc_std"] == pytest.approx(np.std(s["acc_per_seed"], ddof=1))
    assert s["acc_mean"] == pytest.approx(np.mean(s["acc_per_seed"]))


def test_similarity_is_normalised_by_cluster_size_and_empty_clusters_are_zero():
    # cluster 0: 60 of class A, 40 of class B (sim .6/.4); cluster 1: 5 A, 1 B (sim .833/.167); cluster 2 empty
    c = np.array([0] * 100 + [1] * 6)
    y = np.array([0] * 60 + [1] * 40 + [0] * 5 + [1])
    ov = overlap_matrix(c, y, 3, 2)
    sim = cluster_class_similarity(ov)
    assert np.all(np.isfinite(sim)) and np.array_equal(sim[2], [0.0, 0.0])
    np.testing.assert_allclose(sim[:2], [[0.6, 0.4], [5 / 6, 1 / 6]])
    mapping = hungarian_mapping(sim)
    # total similarity: 0->B, 1->A gives .4 + .833 > 0->A, 1->B .6 + .167 (raw counts would pick the latter)
    assert mapping[0] == 1 and mapping[1] == 0 and mapping[2] == -1


def test_known_accuracy_and_k_different_from_classes():
    # train: clusters 0,1,2 are pure classes 2,0,1; cluster 3 mixed (class 0 majority) -> unmatched with 3 classes
    tc = np.array([0] * 10 + [1] * 10 + [2] * 10 + [3] * 4)
    ty = np.array([2] * 10 + [0] * 10 + [1] * 10 + [0, 0, 0, 1])
    # val: 8 samples; cluster 0 -> class 2 (2 right, 1 wrong), cluster 1 -> class 0 (1 right), cluster 2 -> 1
    # (1 wrong), cluster 3 -> unmatched (2 wrong): 3 right of 8
    vc = np.array([0, 0, 0, 1, 2, 3, 3, 0])
    vy = np.array([2, 2, 0, 0, 0, 0, 1, 1])
    res = align(tc, ty, vc, vy, 4, 3)
    assert res["mapping"].tolist() == [2, 0, 1, -1]
    assert res["acc"] == pytest.approx(100 * 3 / 8)
    # k < classes: 2 clusters for 3 classes -> class 2 has no cluster, its samples are wrong
    tc2 = np.array([0, 0, 1, 1, 1])
    ty2 = np.array([0, 0, 1, 1, 2])
    res2 = align(tc2, ty2, np.array([0, 1, 1]), np.array([0, 1, 2]), 2, 3)
    assert res2["mapping"].tolist() == [0, 1] and res2["acc"] == pytest.approx(200 / 3)


def test_cluster_alignment_with_more_clusters_and_seed_statistics():
    rng = np.random.default_rng(3)
    tx, ty = rng.normal(size=(300, 8)).astype(np.float32), rng.integers(0, 4, 300)
    vx, vy = rng.normal(size=(100, 8)).astype(np.float32), rng.integers(0, 4, 100)
    res = cluster_alignment(tx, ty, vx, vy, k=7, seeds=[0, 1, 2, 3])
    s = res.summary()
    assert s["k"] == 7 and s["num_classes"] == 4 and len(s["acc_per_seed"]) == 4
    assert s["acc_mean"] == pytest.approx(np.mean(s["acc_per_seed"]))
    assert s["acc_std"] == pytest.approx(np.std(s["acc_per_seed"], ddof=1))
    assert (res.mapping >= 0).sum() == 4 and (res.mapping == -1).sum() == 3
    assert all(np.isfinite(v) for v in s["nmi_per_seed"] + s["ari_per_seed"])
    assert "±" in str(res)


def test_kmeans_backends_and_assign():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(0, 0.1, (50, 4)), rng.normal(5, 0.1, (50, 4))]).astype(np.float32)
    for backend in ("auto", "torch"):
        c = kmeans(x, 2, niter=10, seed=0, backend=backend)
        a = assign(x, c, backend=backend)
        assert c.shape == (2, 4)
        assert len(set(a[:50])) == 1 and len(set(a[50:])) == 1 and a[0] != a[99]
    with pytest.raises(ValueError):
        kmeans(x[:3], 5)
    assert np.isnan(mapped_accuracy(np.array([0]), [], []))


def test_cluster_grid_png_has_rows_and_columns(tmp_path):
    rng = np.random.default_rng(5)
    n = 60
    images = torch.rand(n, 3, 8, 8)
    clusters = rng.integers(0, 6, n)
    mapping = np.array([2, 0, 1, -1, 3, 4])
    info = plot_cluster_grid(tmp_path / "grid.png", clusters, mapping, ["a", "b", "c", "d", "e"], images=images,
                             rows=4, cols=5, cell_px=32, label_cells=2)
    assert info["rows"] == 4 and info["cols"] == 5 and info["n_axes"] == 20
    assert len(set(info["clusters"])) == 4
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == ((5 + 2) * 32, 4 * 32)
    expect = {0: "c", 1: "a", 2: "b", 3: "unmatched", 4: "d", 5: "e"}
    assert info["labels"] == [expect[c] for c in info["clusters"]]
    # only 2 non-empty clusters: 2 rows; a dataset + denormalise function instead of an image array
    ds = torch.utils.data.TensorDataset((images - 0.5) / 0.25, torch.zeros(n), torch.arange(n))
    info2 = plot_cluster_grid(tmp_path / "grid2.png", np.array([0, 4] * 30), mapping, list("abcde"), dataset=ds,
                              denormalize=lambda x: x * 0.25 + 0.5, rows=10, cols=3, cell_px=20)
    assert info2["rows"] == 2 and info2["n_axes"] == 6
    with Image.open(tmp_path / "grid2.png") as im:
        assert im.size == ((3 + 2) * 20, 2 * 20)


def test_confusion_png(tmp_path):
    vc = np.array([0, 0, 1, 2, 2, 2])
    vy = np.array([1, 1, 0, 2, 2, 0])
    info = plot_confusion(tmp_path / "conf.png", vc, vy, np.array([1, 0, 2]), ["x", "y", "z"])
    assert info["shape"] == (3, 3) and info["column_order"] == [1, 0, 2]
    with Image.open(tmp_path / "conf.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100
