"""Cluster alignment (the paper's unsupervised evaluation).

1. k-means with faiss on **all** train features (k = number of classes by default, 20 iterations, seeded; faiss'
   default subsampling to 256 points per centroid is switched off). Features are L2-normalised first (the
   embeddings every other evaluation scores; ``normalize=False`` to cluster raw features). Without faiss a
   torch Lloyd k-means with the same iterations is used (not bit-identical to faiss).
2. Train and val features are assigned to the nearest centroid (L2).
3. The cluster x class overlap matrix ``|C ∩ Y|`` of the **train** assignment is one ``np.bincount`` (no loop over
   clusters or samples); similarity ``|C ∩ Y| / |C|``, with an empty cluster similar 0 to every class.
4. One-to-one cluster -> class mapping maximising the summed similarity: Hungarian algorithm
   (``scipy.optimize.linear_sum_assignment``). With k != #classes the assignment is rectangular: only
   ``min(k, #classes)`` pairs are matched; val samples falling in an unmatched cluster count as wrong (and with
   k < #classes the samples of classes left without a cluster are necessarily wrong).
5. Accuracy = % of val samples whose cluster maps to their class. NMI and ARI (sklearn) of the val assignment
   against the val labels are reported too (they need no mapping).

:func:`cluster_alignment` repeats this for several k-means seeds (default 5) and reports mean ± std (sample std,
``ddof=1``; 0 for a single seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch


def _np(x, dtype=None) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


def _faiss_or_none():
    from ._faiss import get_faiss

    try:
        return get_faiss()
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------- k-means
def kmeans(x, k: int, niter: int = 20, seed: int = 0, backend: str = "auto") -> np.ndarray:
    """``k x D`` centroids of ``x`` (float32) after ``niter`` Lloyd iterations, seeded; uses all points."""
    x = _np(x, np.float32)
    n, d = x.shape
    if not 0 < k <= n:
        raise ValueError(f"k-means needs 0 < k <= number of points, got k={k} for {n} points")
    faiss = _faiss_or_none() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise ImportError("backend='faiss' but faiss is not installed")
    if faiss is not None:
        from ._faiss import gpu_available

        km = faiss.Kmeans(d, k, niter=niter, seed=int(seed), verbose=False, gpu=gpu_available(faiss),
                          max_points_per_centroid=int(math.ceil(n / k)) + 1, min_points_per_centroid=1)
        km.train(x)
        return np.asarray(km.centroids, dtype=np.float32).reshape(k, d)
    return _torch_kmeans(torch.from_numpy(x), k, niter, seed).numpy()


def _torch_kmeans(x: torch.Tensor, k: int, niter: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    c = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(niter):
        a = _torch_assign(x, c)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k).to(x.dtype)
        nonempty = counts > 0
        c[nonempty] = sums[nonempty] / counts[nonempty, None]  # an empty cluster keeps its centroid
    return c


def _torch_assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    c2 = (c * c).sum(1)
    out = [((c2[None] - 2.0 * x[s:s + chunk] @ c.t())).argmin(1) for s in range(0, x.shape[0], chunk)]
    return torch.cat(out)


def assign(x, centroids, backend: str = "auto") -> np.ndarray:
    """Index of the nearest centroid (L2) of every row of ``x``."""
    x, c = _np(x, np.float32), _np(centroids, np.float32)
    faiss = _faiss_or_none() if backend in ("auto", "faiss") else None
    if faiss is not None:
        index = faiss.IndexFlatL2(c.shape[1])
        index.add(c)
        _, idx = index.search(x, 1)
        return idx.reshape(-1).astype(np.int64)
    return _torch_assign(torch.from_numpy(x), torch.from_numpy(c)).numpy().astype(np.int64)


# ------------------------------------------------------------------------------------------- matching step
def overlap_matrix(cluster_ids, labels, n_clusters: int, n_classes: int) -> np.ndarray:
    """``n_clusters x n_classes`` int64 counts ``|C_i ∩ Y_j|`` in one ``np.bincount``."""
    c, y = _np(cluster_ids, np.int64).reshape(-1), _np(labels, np.int64).reshape(-1)
    if c.shape != y.shape:
        raise ValueError(f"{c.shape[0]} cluster ids but {y.shape[0]} labels")
    if c.size and (c.min() < 0 or c.max() >= n_clusters or y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"cluster ids must lie in [0, {n_clusters}) and labels in [0, {n_classes})")
    return np.bincount(c * n_classes + y, minlength=n_clusters * n_classes).reshape(n_clusters, n_classes)


def cluster_class_similarity(overlap: np.ndarray) -> np.ndarray:
    """``|C ∩ Y| / |C|`` per (cluster, class); an empty cluster has similarity 0 to every class (no 0/0)."""
    overlap = np.asarray(overlap, dtype=np.float64)
    size = overlap.sum(1, keepdims=True)
    return np.divide(overlap, size, out=np.zeros_like(overlap), where=size > 0)


def hungarian_mapping(similarity: np.ndarray) -> np.ndarray:
    """One-to-one cluster -> class mapping maximising total similarity; ``-1`` for clusters left unmatched
    (k > #classes). Rectangular matrices are fine (``min(k, #classes)`` pairs)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.asarray(similarity, dtype=np.float64), maximize=True)
    mapping = np.full(similarity.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def mapped_accuracy(mapping: np.ndarray, cluster_ids, labels) -> float:
    """% of samples whose cluster maps to their class (unmatched clusters: wrong)."""
    c, y = _np(cluster_ids, np.int64).reshape(-1), _np(labels, np.int64).reshape(-1)
    if c.size == 0:
        return float("nan")
    return 100.0 * float(np.mean(np.asarray(mapping)[c] == y))


def align(train_clusters, train_y, val_clusters, val_y, n_clusters: int, n_classes: int) -> dict[str, Any]:
    """The matching step for one clustering: overlap on train, similarity, Hungarian, val accuracy."""
    overlap = overlap_matrix(train_clusters, train_y, n_clusters, n_classes)
    mapping = hungarian_mapping(cluster_class_similarity(overlap))
    return {"acc": mapped_accuracy(mapping, val_clusters, val_y), "mapping": mapping, "overlap": overlap}


# ---------------------------------------------------------------------------------------------- the protocol
@dataclass
class ClusterAlignmentResult:
    """Accuracy (%) over seeds plus NMI/ARI of the val assignment; the first seed's clustering for pictures."""

    k: int
    num_classes: int
    seeds: list[int]
    accs: list[float]
    nmis: list[float]
    aris: list[float]
    mapping: np.ndarray = field(repr=False)  # first seed: cluster -> class (-1 unmatched)
    train_clusters: np.ndarray = field(repr=False)
    val_clusters: np.ndarray = field(repr=False)
    overlap: np.ndarray = field(repr=False)  # first seed, train

    @staticmethod
    def _ms(v: Sequence[float]) -> tuple[float, float]:
        a = np.asarray(v, dtype=np.float64)
        return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0

    @property
    def acc_mean(self) -> float:
        return self._ms(self.accs)[0]

    @property
    def acc_std(self) -> float:
        return self._ms(self.accs)[1]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"k": self.k, "num_classes": self.num_classes, "seeds": list(self.seeds)}
        for name, v in (("acc", self.accs), ("nmi", self.nmis), ("ari", self.aris)):
            m, s = self._ms(v)
            out[f"{name}_mean"], out[f"{name}_std"], out[f"{name}_per_seed"] = m, s, [float(a) for a in v]
        return out

    def __str__(self) -> str:
        s = self.summary()
        return (f"cluster alignment (k={self.k}, {len(self.seeds)} seeds): acc {s['acc_mean']:.2f} ± "
                f"{s['acc_std']:.2f} %, NMI {s['nmi_mean']:.4f} ± {s['nmi_std']:.4f}, "
                f"ARI {s['ari_mean']:.4f} ± {s['ari_std']:.4f}")


def cluster_alignment(train_x, train_y, val_x, val_y, num_classes: Optional[int] = None, k: Optional[int] = None,
                      niter: int = 20, seeds: int | Iterable[int] = 5, normalize: bool = True,
                      backend: str = "auto") -> ClusterAlignmentResult:
    """The paper's cluster alignment, repeated over k-means seeds (``seeds``: a count n for 0..n-1, or a list)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    tx, vx = _np(train_x, np.float32), _np(val_x, np.float32)
    ty, vy = _np(train_y, np.int64).reshape(-1), _np(val_y, np.int64).reshape(-1)
    if normalize:
        tx, vx = _l2_normalize(tx), _l2_normalize(vx)
    num_classes = int(num_classes or int(max(ty.max(), vy.max())) + 1)
    k = int(k or num_classes)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("cluster alignment needs at least one seed")
    accs, nmis, aris = [], [], []
    first: dict[str, Any] = {}
    for seed in seed_list:
        centroids = kmeans(tx, k, niter=niter, seed=seed, backend=backend)
        tc, vc = assign(tx, centroids, backend), assign(vx, centroids, backend)
        res = align(tc, ty, vc, vy, k, num_classes)
        accs.append(res["acc"])
        nmis.append(float(normalized_mutual_info_score(vy, vc)))
        aris.append(float(adjusted_rand_score(vy, vc)))
        if not first:
            first = {"mapping": res["mapping"], "overlap": res["overlap"], "train_clusters": tc, "val_clusters": vc}
    return ClusterAlignmentResult(k=k, num_classes=num_classes, seeds=seed_list, accs=accs, nmis=nmis, aris=aris,
                                  **first)


# ---------------------------------------------------------------------------------------------- pictures
def _images_for(indices: Sequence[int], images=None, dataset=None, denormalize=None) -> list[np.ndarray]:
    """``H x W x C`` float arrays in [0, 1] for ``indices``, from an image array/tensor or a dataset."""
    out = []
    for i in indices:
        if images is not None:
            img = images[int(i)]
        else:
            img = dataset[int(i)][0]
            if denormalize is not None:
                img = denormalize(img)
        if not torch.is_tensor(img) and hasattr(img, "convert"):  # a PIL image
            img = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        img = _np(img)
        if img.ndim == 3 and img.shape[0] in (1, 3):
            img = np.transpose(img, (1, 2, 0))  # C x H x W (the expected layout) -> H x W x C
        if img.dtype == np.uint8:
            img = img.astype(np.float32) / 255.0
        img = np.clip(img.astype(np.float32), 0.0, 1.0)
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        out.append(img)
    return out


def plot_cluster_grid(path, cluster_ids, mapping, class_names: Sequence[str], images=None, dataset=None,
                      denormalize=None, rows: int = 10, cols: int = 10, seed: int = 0, cell_px: int = 64,
                      label_cells: int = 2, gap: float = 0.08) -> dict[str, Any]:
    """The paper's picture: ``rows`` random non-empty clusters (rows), ``cols`` random members each (columns,
    blank when a cluster is smaller), each row labelled with its mapped class name ("unmatched" for -1). No
    cherry-picking: clusters and members are drawn with ``seed``.

    Images: ``images`` (``N x C x H x W`` or ``N x H x W x C``, un-normalised, in [0, 1] or uint8) indexed like
    ``cluster_ids``, or ``dataset`` (``dataset[i][0]``) with ``denormalize`` mapping its output back to [0, 1].
    The PNG is exactly ``((cols + label_cells) * cell_px) x (rows * cell_px)`` pixels; each image fills its
    cell but for a white margin of ``gap / 2`` of the cell on every side (``gap=0.08``: 5 px between 64 px cells),
    so neighbouring tiles do not touch.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if (images is None) == (dataset is None):
        raise ValueError("pass exactly one of images= or dataset=")
    if not 0 <= gap < 1:
        raise ValueError(f"gap={gap} is invalid: need 0 <= gap < 1 (a fraction of a cell)")
    c = _np(cluster_ids, np.int64).reshape(-1)
    mapping = np.asarray(mapping)
    rng = np.random.default_rng(seed)
    nonempty = np.unique(c)
    rows = int(min(rows, nonempty.size))
    chosen = rng.choice(nonempty, size=rows, replace=False)
    members = [np.flatnonzero(c == cl) for cl in chosen]
    picks = [rng.choice(m, size=min(cols, m.size), replace=False) for m in members]
    dpi = 100
    cell = cell_px / dpi
    fig = plt.figure(figsize=((cols + label_cells) * cell, rows * cell), dpi=dpi)
    total_w = cols + label_cells
    labels = []
    for r, (cl, pick) in enumerate(zip(chosen, picks)):
        cls = int(mapping[cl]) if cl < mapping.size else -1
        name = class_names[cls] if 0 <= cls < len(class_names) else "unmatched"
        labels.append(name)
        y0 = 1.0 - (r + 1) / rows
        fig.text((label_cells - 0.1) / total_w, y0 + 0.5 / rows, f"{name}\n(cluster {int(cl)})", ha="right",
                 va="center", fontsize=max(5, int(cell_px / 9)))
        imgs = _images_for(pick, images=images, dataset=dataset, denormalize=denormalize)
        for j in range(cols):
            ax = fig.add_axes([(label_cells + j + gap / 2) / total_w, y0 + gap / 2 / rows, (1.0 - gap) / total_w,
                               (1.0 - gap) / rows])
            ax.set_axis_off()
            if j < len(imgs):
                ax.imshow(imgs[j], cmap="gray" if imgs[j].ndim == 2 else None, vmin=0.0, vmax=1.0,
                          interpolation="nearest")
    n_axes = len(fig.axes)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return {"path": str(path), "rows": rows, "cols": cols, "clusters": [int(x) for x in chosen], "labels": labels,
            "n_axes": n_axes, "size": ((cols + label_cells) * cell_px, rows * cell_px)}


def plot_confusion(path, val_clusters, val_y, mapping, class_names: Sequence[str], k: Optional[int] = None,
                   title: Optional[str] = None) -> dict[str, Any]:
    """Cluster -> class confusion matrix of the val assignment: rows = true classes, columns = clusters ordered
    by the class they map to (so a perfect alignment is diagonal; unmatched clusters last), each row
    normalised to sum 1."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    mapping = np.asarray(mapping, dtype=np.int64)
    n_classes = len(class_names)
    k = int(k or mapping.size)
    counts = overlap_matrix(val_clusters, val_y, k, n_classes).T  # classes x clusters
    key = np.where(mapping >= 0, mapping, n_classes + np.arange(k))
    order = np.argsort(key, kind="stable")
    m = counts[:, order].astype(np.float64)
    m = np.divide(m, m.sum(1, keepdims=True), out=np.zeros_like(m), where=m.sum(1, keepdims=True) > 0)
    side = float(np.clip(0.25 * max(n_classes, k), 4, 16))
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=100)
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xlabel("cluster (ordered by mapped class)")
    ax.set_ylabel("true class")
    if n_classes <= 40:
        ax.set_yticks(range(n_classes), labels=list(class_names), fontsize=7)
    if k <= 40:
        ax.set_xticks(range(k), labels=[str(int(x)) for x in order], fontsize=7, rotation=90)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the class's val samples")
    acc = mapped_accuracy(mapping, val_clusters, val_y)
    ax.set_title(title or f"cluster -> class (val), alignment accuracy {acc:.2f}%")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"path": str(path), "shape": tuple(m.shape), "column_order": order.tolist()}
