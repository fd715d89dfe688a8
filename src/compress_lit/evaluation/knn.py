"""k-nearest-neighbour classification on L2-normalised features (the paper's "NN" is k = 1).

* similarity: cosine (inner product of L2-normalised float32 features);
* search: faiss ``IndexFlatIP`` (moved to the GPU when faiss sees one) or an exact torch search (``backend="torch"``,
  or automatically when ``import faiss`` fails). The torch search is chunked over queries *and* over the bank (a
  running top-k), so memory is bounded by ``chunk x bank_chunk`` similarities whatever the bank size;
* both backends re-score the k neighbours found with the same torch float32 dot product and order them by
  (similarity desc, bank index asc), so the vote sees identical inputs: their predictions agree exactly unless two
  bank items tie at the k-th place to within float rounding;
* vote: ``"majority"`` (one vote per neighbour) or ``"distance"`` (each neighbour weighs ``exp(sim / temperature)``,
  the weighting of Wu et al. 2018, temperature 0.07 by default). Ties between classes with the same score go to the
  class whose nearest member ranks first (exact, no floating-point bonus);
* top-5: the true class among the 5 best-scoring classes (classes without a vote rank after every voted class, by
  class index; so for k < 5 top-5 is only a weak bound). Reported when there are more than 5 classes.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("auto", "faiss", "torch")
WEIGHTINGS = ("majority", "distance")


def _faiss():
    """The faiss module, or ImportError (a separate function so tests can simulate its absence)."""
    from ._faiss import get_faiss

    return get_faiss()


def resolve_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-NN backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "torch":
        return "torch"
    try:
        _faiss()
        return "faiss"
    except ImportError:
        if backend == "faiss":
            raise
        return "torch"


def _as_float(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).float()


# ------------------------------------------------------------------------------------------------- search
@torch.no_grad()
def _torch_search(bank: torch.Tensor, queries: torch.Tensor, k: int, chunk: int, bank_chunk: int):
    vals_out, idx_out = [], []
    for qs in range(0, queries.shape[0], chunk):
        q = queries[qs:qs + chunk]
        best_v = best_i = None
        for bs in range(0, bank.shape[0], bank_chunk):
            sims = q @ bank[bs:bs + bank_chunk].t()
            v, i = sims.topk(min(k, sims.shape[1]), dim=1)
            i = i + bs
            if best_v is not None:
                v, j = torch.cat([best_v, v], 1).topk(k, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_v, best_i = v, i
        vals_out.append(best_v)
        idx_out.append(best_i)
    return torch.cat(idx_out)


def _faiss_search(bank: torch.Tensor, queries: torch.Tensor, k: int, chunk: int):
    from ._faiss import gpu_available

    faiss = _faiss()
    d = bank.shape[1]
    index = faiss.IndexFlatIP(d)
    if gpu_available(faiss):
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    out = []
    step = max(chunk, 4096)  # faiss blocks internally; larger query blocks are faster and still bounded
    index.add(np.ascontiguousarray(bank.cpu().numpy(), dtype=np.float32))
    for qs in range(0, queries.shape[0], step):
        _, idx = index.search(np.ascontiguousarray(queries[qs:qs + step].cpu().numpy(), dtype=np.float32), k)
        out.append(torch.from_numpy(idx.astype(np.int64)))
    return torch.cat(out).to(queries.device)


@torch.no_grad()
def knn_search(train_x, test_x, k: int, backend: str = "auto", chunk: int = 1024, bank_chunk: int = 32768,
               normalize: bool = True, device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` cosine-nearest bank rows of every query: ``(similarities, indices)``, both ``Q x k``, nearest first
    (ties in similarity by bank index). Similarities are recomputed in torch float32 for either backend.
    ``device``: where the torch search and the re-scoring run (default: the bank's device)."""
    bank = _as_float(train_x)
    if device is not None:
        bank = bank.to(device)
    queries = _as_float(test_x).to(bank.device)
    if normalize:
        bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    k = min(k, bank.shape[0])
    if resolve_backend(backend) == "faiss":
        idx = _faiss_search(bank, queries, k, chunk)
    else:
        idx = _torch_search(bank, queries, k, chunk, bank_chunk)
    idx = idx.clamp_min(0)  # faiss returns -1 only when the bank has fewer than k rows (excluded above)
    sims_parts = []
    for qs in range(0, queries.shape[0], chunk):  # exact re-scoring, identical for both backends
        q = queries[qs:qs + chunk]
        sims_parts.append(torch.einsum("qd,qkd->qk", q, bank[idx[qs:qs + chunk]]))
    sims = torch.cat(sims_parts) if sims_parts else torch.zeros(0, k)
    # deterministic order: similarity desc, then bank index asc
    order = torch.argsort(idx, dim=1, stable=True)
    sims, idx = sims.gather(1, order), idx.gather(1, order)
    order = torch.argsort(-sims, dim=1, stable=True)
    return sims.gather(1, order), idx.gather(1, order)


# --------------------------------------------------------------------------------------------------- vote
def _class_ranking(nn_sims: torch.Tensor, nn_labels: torch.Tensor, num_classes: int, weighting: str,
                   temperature: float) -> torch.Tensor:
    """Classes of each query ordered best first: by score desc, then by the rank of the class's nearest member."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown k-NN weighting {weighting!r}; choose one of {list(WEIGHTINGS)}")
    q, k = nn_labels.shape
    w = torch.ones_like(nn_sims) if weighting == "majority" else torch.exp((nn_sims - 1.0) / temperature)
    scores = torch.zeros(q, num_classes, dtype=torch.float64, device=nn_labels.device)
    scores.scatter_add_(1, nn_labels, w.double())
    first = torch.full((q, num_classes), k, dtype=torch.long, device=nn_labels.device)
    ranks = torch.arange(k, device=nn_labels.device).expand(q, k)
    first.scatter_reduce_(1, nn_labels, ranks, reduce="amin")
    order = torch.argsort(first, dim=1, stable=True)  # secondary key: nearest member first, then class index
    order = order.gather(1, torch.argsort(-scores.gather(1, order), dim=1, stable=True))
    return order


@torch.no_grad()
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int = 1,
                num_classes: int | None = None, chunk: int = 1024, weighting: str = "majority",
                temperature: float = 0.07, backend: str = "auto", topk: int = 1,
                device: str | torch.device | None = None) -> torch.Tensor:
    """Predicted labels of ``test_x`` by a vote of its ``k`` cosine-nearest training samples (``topk > 1``: the
    ``topk`` best classes per query, ``Q x topk``; else ``Q``)."""
    train_y = torch.as_tensor(np.asarray(train_y) if not torch.is_tensor(train_y) else train_y).long()
    num_classes = int(num_classes or int(train_y.max()) + 1)
    sims, idx = knn_search(train_x, test_x, k, backend=backend, chunk=chunk, device=device)
    nn_labels = train_y.to(idx.device)[idx]
    out = [_class_ranking(sims[s:s + chunk], nn_labels[s:s + chunk], num_classes, weighting, temperature)[:, :topk]
           for s in range(0, idx.shape[0], chunk)]
    ranking = torch.cat(out).cpu() if out else torch.zeros(0, topk, dtype=torch.long)
    return ranking if topk > 1 else ranking[:, 0]


@torch.no_grad()
def knn_evaluate(train_x, train_y, test_x, test_y, ks: Iterable[int] = (1, 20), num_classes: int | None = None,
                 weighting: str = "majority", temperature: float = 0.07, backend: str = "auto",
                 chunk: int = 1024, device: str | torch.device | None = None) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy in % for each k, from one search with the
    largest k. Keys ``top1_k{k}`` and ``top5_k{k}``."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] <= 0:
        raise ValueError(f"every k must be > 0, got {ks}")
    train_y = torch.as_tensor(np.asarray(train_y) if not torch.is_tensor(train_y) else train_y).long()
    test_y = torch.as_tensor(np.asarray(test_y) if not torch.is_tensor(test_y) else test_y).long()
    num_classes = int(num_classes or int(max(train_y.max(), test_y.max())) + 1)
    sims, idx = knn_search(train_x, test_x, ks[-1], backend=backend, chunk=chunk, device=device)
    nn_labels = train_y.to(idx.device)[idx]
    test_y = test_y.to(idx.device)
    n = max(1, idx.shape[0])
    out: dict[str, float] = {}
    for k in ks:
        kk = min(k, idx.shape[1])
        hit1 = hit5 = 0
        for s in range(0, idx.shape[0], chunk):  # bounded memory: chunk x num_classes scores at a time
            ranking = _class_ranking(sims[s:s + chunk, :kk], nn_labels[s:s + chunk, :kk], num_classes, weighting,
                                     temperature)[:, :5]
            y = test_y[s:s + chunk]
            hit1 += int((ranking[:, 0] == y).sum())
            hit5 += int((ranking == y[:, None]).any(1).sum())
        out[f"top1_k{k}"] = 100.0 * hit1 / n
        if num_classes > 5:
            out[f"top5_k{k}"] = 100.0 * hit5 / n
    return out


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 1, num_classes: int | None = None, **kw) -> float:
    """Top-1 accuracy (in %) of k-NN classification."""
    pred = knn_predict(train_x, train_y, test_x, k, num_classes=num_classes, **kw)
    test_y = torch.as_tensor(np.asarray(test_y) if not torch.is_tensor(test_y) else test_y).long()
    return 100.0 * (pred.cpu() == test_y.cpu()).double().mean().item()
