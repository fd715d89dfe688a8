"""The raw-pixel floor: the flattened, normalised evaluation image as an "embedding".

Every table of learned features should beat it; on small grey data sets (Fashion-MNIST) nearest neighbours on
raw pixels are strong (docs/reproduction.md). The grey tensor data sets are stored with one channel and
replicated to ``in_channels`` on the fly, so ``grey=True`` keeps only the first channel: the copies would change
nothing for cosine k-NN or k-means but would triple each pixel's weight in the linear probe's SGD.
"""
from __future__ import annotations

import torch
from torch import nn


class RawPixels(nn.Module):
    """``forward(x)`` = ``x`` flattened (``x[:, :1]`` flattened when ``grey``)."""

    def __init__(self, grey: bool = False):
        super().__init__()
        self.grey = bool(grey)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1] if self.grey else x).flatten(1)
