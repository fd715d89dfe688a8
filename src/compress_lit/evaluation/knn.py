"""k-nearest-neighbour classification on L2-normalised features (the paper's "NN" is k = 1).

Cosine similarity, majority vote among the k nearest (ties broken towards the class of the nearest neighbour
holding a tied count… simply: the smallest summed rank), exact, chunked over queries so memory stays bounded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int = 1,
                num_classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Predicted labels of ``test_x`` by majority vote of its ``k`` cosine-nearest training samples.

    Ties between classes with the same vote count go to the class whose nearest member ranks first.
    """
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    k = min(k, train_x.shape[0])
    num_classes = int(num_classes or int(train_y.max()) + 1)
    bank = F.normalize(train_x.float(), dim=1)
    train_y = train_y.long()
    preds = []
    for start in range(0, test_x.shape[0], chunk):
        q = F.normalize(test_x[start:start + chunk].float(), dim=1)
        sims = q @ bank.t()
        _, nn_idx = sims.topk(k, dim=1)  # sorted, nearest first
        nn_lab = train_y[nn_idx]
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, nn_lab, torch.ones_like(nn_lab, dtype=torch.float))
        # tie-break: a small bonus decreasing with the rank of each class's nearest member
        rank_bonus = torch.zeros(q.shape[0], num_classes)
        ranks = torch.arange(k, 0, -1, dtype=torch.float).expand_as(nn_lab) / (k + 1)
        rank_bonus.scatter_reduce_(1, nn_lab, ranks, reduce="amax")
        preds.append((votes + rank_bonus).argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 1, **kw) -> float:
    """Top-1 accuracy (in %) of k-NN classification."""
    pred = knn_predict(torch.as_tensor(train_x), torch.as_tensor(train_y), torch.as_tensor(test_x), k, **kw)
    return 100.0 * (pred == torch.as_tensor(test_y).long()).float().mean().item()
