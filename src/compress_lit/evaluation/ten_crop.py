"""10-crop evaluation (``ten_crop=true`` of ``compress_lit.evaluate`` and ``compress_lit.linear``).

Each held-out image is resized and cut into ten crops — the four corners and the centre, and the same five of
the horizontally flipped image (torchvision's ``TenCrop``, in its order) — and the prediction is averaged over
the ten:

* **linear probe**: the head's softmax probabilities of the ten crops are averaged; the prediction (top-1, top-5)
  is the ranking of that mean (:func:`average_crop_probabilities`);
* **k-NN** (and cluster alignment): the ten crop features are L2-normalised and averaged, and that mean is the
  image's query feature (it is L2-normalised again by the k-NN, so this is the normalised mean direction of the
  crops; :func:`crop_mean_features`); the vote is then the usual one over the neighbours of that one query.

Only the held-out split is 10-cropped: the k-NN bank, the cluster centroids and the probe's standardisation
statistics stay the centre-crop train features, and the probe still trains on RandomResizedCrop + flip.

Image folders: ``Resize(resize_size)`` then ``TenCrop(image_size)`` (224 of 256 for ImageNet). The in-memory
data sets (digits, Fashion-MNIST) are stored at ``image_size`` with no ``resize_size``: they are resized by the
same 256/224 ratio first (16 -> 18 px, 28 -> 32 px) and then cut into ten ``image_size`` crops.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ..data.datamodule import bank_loader

TEN_CROPS = 10
LABEL = "10-crop"  # how tables label a 10-crop number


def tensor_resize_size(image_size: int) -> int:
    """The resize before ten-cropping an in-memory (tensor) data set: ``image_size`` x 256/224, rounded."""
    return int(round(int(image_size) * 256 / 224))


class StackCrops:
    """The five/ten crops of ``TenCrop`` (a tuple of images) -> float tensors, normalised, stacked:
    ``crops x C x H x W``."""

    def __init__(self, to_float: Callable, normalize: Callable):
        self.to_float, self.normalize = to_float, normalize

    def __call__(self, crops: Sequence[Any]) -> torch.Tensor:
        return torch.stack([self.normalize(self.to_float(c)) for c in crops])

    def __repr__(self) -> str:
        return f"StackCrops({self.to_float!r}, {self.normalize!r})"


class TensorTenCrop:
    """10-crop of a grey ``1 x S x S`` float image in [0, 1]: bilinear (antialiased) resize to ``resize_size``,
    ``ten_crop(crop_size)``, normalisation (broadcast to ``len(mean)`` channels): ``10 x C x crop x crop``."""

    def __init__(self, resize_size: int, crop_size: int, mean: Sequence[float], std: Sequence[float]):
        from ..data.transforms import TensorNormalize

        self.resize_size, self.crop_size = int(resize_size), int(crop_size)
        self.normalize = TensorNormalize(mean, std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import ten_crop

        if tuple(x.shape[-2:]) != (self.resize_size, self.resize_size):
            x = F.interpolate(x[None], size=(self.resize_size, self.resize_size), mode="bilinear",
                              align_corners=False, antialias=True)[0].clamp_(0.0, 1.0)
        return self.normalize(torch.stack(ten_crop(x, [self.crop_size, self.crop_size])))

    def __repr__(self) -> str:
        return f"TensorTenCrop(resize={self.resize_size}, crop={self.crop_size}, {self.normalize!r})"


def ten_crop_transform(cfg) -> Callable:
    """The 10-crop evaluation transform of the data config ``cfg`` (module docstring): images -> ``10 x C x H x W``."""
    from ..data.transforms import TENSOR_DATASETS, image_ops

    size = int(cfg.image_size)
    if cfg.name in TENSOR_DATASETS:
        return TensorTenCrop(tensor_resize_size(size), size, list(cfg.mean), list(cfg.std))
    T, to_float = image_ops(cfg)
    return T.Compose([T.Resize(int(cfg.resize_size)), T.TenCrop(size),
                      StackCrops(to_float, T.Normalize(list(cfg.mean), list(cfg.std)))])


def ten_crop_loader(dm, cfg):
    """The held-out split of the datamodule ``dm`` with :func:`ten_crop_transform`, in order; batches of
    ``max(1, eval_batch_size // 10)`` images (ten crops each) yielding ``(B x 10 x C x H x W, labels, indices)``."""
    from torch.utils.data import DataLoader

    from ..data.workers import cap_num_workers

    dataset = dm.val_dataset.with_transform(ten_crop_transform(cfg))
    return DataLoader(dataset, batch_size=max(1, int(cfg.eval_batch_size) // TEN_CROPS), shuffle=False,
                      num_workers=cap_num_workers(cfg.num_workers), drop_last=False)


def crop_mean_features(x: torch.Tensor) -> torch.Tensor:
    """``N x crops x D`` -> ``N x D``: the mean of the L2-normalised crop features (``N x D`` passes unchanged)."""
    x = torch.as_tensor(x)
    if x.ndim != 3:
        return x
    return F.normalize(x.float(), dim=2).mean(1)


def average_crop_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """``B x crops x K`` logits -> ``B x K``: the mean over the crops of the softmax probabilities."""
    return logits.float().softmax(dim=-1).mean(dim=1)


class TenCropValidation(pl.LightningDataModule):
    """A datamodule that trains on ``dm``'s training loader and validates on the 10-crop held-out loader (the
    Lightning linear probe with ``ten_crop=true``). Under DDP Lightning shards both loaders as usual."""

    def __init__(self, dm, cfg):
        super().__init__()
        self.dm, self.cfg = dm, cfg

    def setup(self, stage=None) -> None:
        self.dm.setup(stage)

    @property
    def num_classes(self) -> int:
        return self.dm.num_classes

    def train_dataloader(self):
        self.dm.trainer = self.trainer  # data.batch_size is global: the inner module needs the world size
        return self.dm.train_dataloader()

    def val_dataloader(self):
        return ten_crop_loader(self.dm, self.cfg)

    def train_eval_dataloader(self):
        return self.dm.train_eval_dataloader()

    def bank_dataloader(self):
        return bank_loader(self.dm)


__all__ = ["LABEL", "TEN_CROPS", "StackCrops", "TenCropValidation", "TensorTenCrop", "average_crop_probabilities",
           "crop_mean_features", "ten_crop_loader", "ten_crop_transform", "tensor_resize_size"]
