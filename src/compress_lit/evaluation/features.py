"""Feature extraction shared by every evaluation: frozen model, eval mode, no augmentation, in dataset order."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def extract_features(model: nn.Module | Callable, loader, device: str | torch.device = "cpu",
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``loader`` (yielding ``(x, y, index)``) and return (features, labels) in index order."""
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    feats, labels, indices = [], [], []
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="features", leave=False)
    try:
        for x, y, idx in it:
            feats.append(model(x.to(device)).float().cpu())
            labels.append(torch.as_tensor(y))
            indices.append(torch.as_tensor(idx))
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    order = torch.argsort(torch.cat(indices))
    return torch.cat(feats)[order], torch.cat(labels)[order]


def save_features(path, train_x, train_y, test_x, test_y) -> None:
    """Write the exact features an evaluation scored, for checking with other tools."""
    np.savez(path, train_x=np.asarray(train_x), train_y=np.asarray(train_y),
             test_x=np.asarray(test_x), test_y=np.asarray(test_y))
