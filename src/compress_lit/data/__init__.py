"""Data: digits, Fashion-MNIST and image-folder datasets yielding ``(image, label, index)``, and the data module."""
from .datamodule import CompressDataModule, build_datamodule
from .datasets import DatasetError, verify_images
from .transforms import MultiView, eval_transform, train_transform

__all__ = ["CompressDataModule", "DatasetError", "MultiView", "build_datamodule", "eval_transform",
           "train_transform", "verify_images"]
