"""Datasets: scikit-learn digits, Fashion-MNIST (IDX files) and ImageNet-style image folders.

Every dataset yields ``(image, label, index)``: ``index`` is the sample's position in *that* dataset
(``0..len-1``, also after ``train_subset``/``val_subset``), so features cached for a dataset (e.g. the teacher's
embeddings) can be looked up by index. With a transform the image is what the transform returns (a normalised
float ``C x H x W`` tensor, or a list of them for :class:`~compress_lit.data.transforms.MultiView`).

Small datasets (digits, Fashion-MNIST) live in memory as tensors (:class:`TensorImageDataset`, one grey channel,
replicated to ``in_channels`` per sample) and are handed to the transform as float tensors in [0, 1]. Image
folders are read with PIL per sample (:class:`ImageFolderDataset`); a corrupt image file raises
:class:`DatasetError` naming it when it is loaded, and :func:`verify_images` lists every unreadable file.

Every failure raises :class:`DatasetError` naming the path involved and what was expected.
"""
from __future__ import annotations

import copy
import gzip
import hashlib
import logging
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

DECODERS = ("pil", "torchvision")  # data.decoder of image folders
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension (N,)
# Fashion-MNIST is resized once at load time when the resized uint8 array fits this budget, else per sample.
PRERESIZE_BUDGET_BYTES = 1 << 30


class DatasetError(RuntimeError):
    """A dataset that cannot be read as configured; the message names the path and what was expected."""


# ----------------------------------------------------------------------------------------------- datasets
class _SelectableDataset(Dataset):
    """Shared helpers: ``with_transform`` (a shallow copy sharing the data) and ``select`` (a subset)."""

    transform: Optional[Callable]

    def with_transform(self, transform: Optional[Callable]):
        """A copy that shares the underlying data but applies ``transform``."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def select(self, indices: Sequence[int]):  # pragma: no cover - implemented by subclasses
        raise NotImplementedError


class TensorImageDataset(_SelectableDataset):
    """In-memory images ``N x 1 x H x W`` (uint8 in 0..255 or float in [0, 1]) with int64 labels.

    ``__getitem__`` converts the image to float in [0, 1], resizes it to ``output_size`` when the stored size
    differs (bilinear, antialiased), applies ``transform`` to the grey ``1 x H x W`` image and replicates a
    1-channel result to ``in_channels`` (a view; the tensor transforms' normalisation already broadcasts to
    ``len(mean)`` channels). Returns ``(image, label, index)``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], in_channels: int = 3,
                 transform: Optional[Callable] = None, output_size: Optional[int] = None):
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be N x 1 x H x W, got {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.classes = list(classes)
        self.in_channels = in_channels
        self.transform = transform
        self.output_size = output_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        x = self.images[index]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.output_size is not None and tuple(x.shape[-2:]) != (self.output_size, self.output_size):
            x = F.interpolate(x[None], size=(self.output_size, self.output_size), mode="bilinear",
                              align_corners=False, antialias=True)[0].clamp_(0.0, 1.0)
        if self.transform is not None:
            x = self.transform(x)  # on the grey channel: cheaper; TensorNormalize broadcasts to len(mean) channels
        return self._replicate(x), int(self.labels[index]), int(index)

    def _replicate(self, x):
        if isinstance(x, (list, tuple)):
            return [self._replicate(v) for v in x]
        if isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[0] == 1 and self.in_channels != 1:
            return x.expand(self.in_channels, *x.shape[1:])
        return x

    def fingerprint(self) -> str:
        """SHA-256 of exactly these samples: the stored images' bytes, their labels and the output size."""
        h = hashlib.sha256(f"tensor:{tuple(self.images.shape)}:{self.images.dtype}:{self.output_size};".encode())
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.contiguous().numpy().tobytes())
        return h.hexdigest()

    def select(self, indices: Sequence[int]) -> "TensorImageDataset":
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        other = copy.copy(self)
        other.images = self.images[idx]
        other.labels = self.labels[idx]
        return other


class ImageFolderDataset(_SelectableDataset):
    """Images read from ``samples`` (a list of ``(path, label)``); returns ``(image, label, index)``.

    ``decoder="pil"``: a PIL image (RGB, or L for ``in_channels=1``). ``decoder="torchvision"``: a uint8
    ``C x H x W`` tensor from ``torchvision.io.decode_image`` (JPEG, PNG, WebP, GIF; the same libjpeg-turbo as PIL,
    pixel-identical on JPEGs; other formats such as BMP or TIFF are decoded by PIL and converted), for the
    transforms' tensor path (``data.decoder``; benchmarks/bench_data.py). A file that cannot be decoded is
    reported when it is loaded: ``__getitem__`` raises :class:`DatasetError` naming the file (files are not opened
    up front; use :func:`verify_images` to scan a folder beforehand).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], in_channels: int = 3,
                 transform: Optional[Callable] = None, root: Optional[str] = None, decoder: str = "pil"):
        if in_channels not in (1, 3):
            raise DatasetError(f"data.in_channels={in_channels} is not supported for image folders (use 1 or 3)")
        if decoder not in DECODERS:
            raise DatasetError(f"data.decoder={decoder!r} is invalid: choose one of {list(DECODERS)}")
        self.samples = list(samples)
        self.classes = list(classes)
        self.in_channels = in_channels
        self.transform = transform
        self.root = root
        self.decoder = decoder

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int):
        path, _ = self.samples[index]
        if self.decoder == "torchvision":
            return self._decode_torchvision(path)
        return self._decode_pil(path)

    def _decode_pil(self, path: str):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                return img.convert("RGB" if self.in_channels == 3 else "L")
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise DatasetError(f"cannot read image {path}: {e} (expected an image file PIL can decode; "
                               f"compress_lit.data.datasets.verify_images lists every unreadable file)") from e

    def _decode_torchvision(self, path: str) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image, read_file

        try:
            rgb = decode_image(read_file(path), mode=ImageReadMode.RGB)
        except RuntimeError:  # a format torchvision.io does not read (BMP, TIFF, PPM), or unreadable: PIL decides
            from torchvision.transforms.v2.functional import pil_to_tensor

            return pil_to_tensor(self._decode_pil(path)).contiguous()
        # grey: PIL's RGB -> L of the decoded colours (libjpeg's own luma differs by a few levels at clipped colours)
        return rgb if self.in_channels == 3 else pil_luma(rgb)

    def __getitem__(self, index: int):
        img = self.load_image(index)
        label = self.samples[index][1]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(label), int(index)

    def fingerprint(self) -> str:
        """SHA-256 of exactly these samples, in order: each file's absolute path, size, mtime (ns) and label (one
        ``stat`` per file; a file replaced or touched changes it)."""
        h = hashlib.sha256(b"imagefolder;")
        for path, label in self.samples:
            try:
                st = os.stat(path)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size = mtime = -1
            h.update(f"{os.path.abspath(path)}\0{size}\0{mtime}\0{label}\n".encode())
        return h.hexdigest()

    def select(self, indices: Sequence[int]) -> "ImageFolderDataset":
        other = copy.copy(self)
        other.samples = [self.samples[i] for i in indices]
        return other


def pil_luma(rgb: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")`` of a uint8 ``3 x H x W`` tensor: ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``."""
    r, g, b = rgb.to(torch.int32).unbind(0)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).to(torch.uint8)[None]


# ------------------------------------------------------------------------------------------------- subsets
def seeded_subset_indices(n: int, size: int, seed: int) -> list[int]:
    """``size`` distinct indices of ``range(n)`` drawn with ``seed``, in increasing order."""
    g = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(n, generator=g)[:size].tolist())


def take_subset(dataset, size: Optional[int], seed: int, key: str):
    """A fixed seeded subset of ``size`` samples (``None``: the whole dataset). ``key`` names the config key."""
    if size is None:
        return dataset
    if size <= 0:
        raise DatasetError(f"{key}={size} is invalid: need a positive number of samples (or null for all)")
    if size >= len(dataset):
        if size > len(dataset):
            log.warning("%s=%d exceeds the %d available samples; using all of them", key, size, len(dataset))
        return dataset
    return dataset.select(seeded_subset_indices(len(dataset), size, seed))


def split_holdout(train, size: int, seed: int):
    """``(rest, holdout)``: ``size`` training samples drawn with ``seed`` become the evaluation split (``data.holdout``:
    hyperparameters are chosen on it, never on the test split); the rest stays the training split. Both keep the
    original sample order; they are disjoint and together are the whole training split."""
    n = len(train)
    if not 0 < size < n:
        raise DatasetError(f"data.holdout={size} is invalid: need 0 < holdout < {n} (the training split's size)")
    held = seeded_subset_indices(n, size, seed + 1)  # not the train_subset draw (which uses seed) of the same split
    keep = sorted(set(range(n)) - set(held))
    return train.select(keep), train.select(held)


# ------------------------------------------------------------------------------------------------------ IDX
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError as e:
        raise DatasetError(f"IDX file {path} does not exist") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"cannot read IDX file {path}: {e} (expected a readable, complete "
                           f"{'gzip-compressed ' if path.suffix == '.gz' else ''}IDX file)") from e


def read_idx(path: str | os.PathLike, expected_magic: Optional[int] = None) -> np.ndarray:
    """Parse an IDX file (plain or ``.gz``) into a numpy array.

    The header is a big-endian 32-bit magic number ``0x0000TTDD`` (``TT``: element type, ``DD``: number of
    dimensions) followed by ``DD`` big-endian 32-bit sizes, then the data. Raises :class:`DatasetError` naming the
    file when the magic number differs from ``expected_magic`` (or is not an IDX magic), or the content is
    truncated or has trailing bytes.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DatasetError(f"IDX file {path} is truncated: {len(raw)} bytes, expected at least a 4-byte header")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DatasetError(f"IDX file {path} has magic number 0x{magic:08X}, expected 0x{expected_magic:08X}")
    type_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if magic >> 16 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(f"IDX file {path} has magic number 0x{magic:08X}, which is not a valid IDX header")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"IDX file {path} is truncated: {len(raw)} bytes, expected a {header}-byte header "
                           f"for {ndim} dimensions")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "longer than its header says"
        raise DatasetError(f"IDX file {path} is {what}: {got} data bytes, expected {expected} for shape {dims}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def find_idx_file(root: str | os.PathLike, stem: str) -> Path:
    """``root/stem.gz`` or ``root/stem``; raises :class:`DatasetError` naming both when neither exists."""
    root = Path(root)
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"IDX file missing: expected {root / stem}.gz or {root / stem}")


def load_idx_split(root: str | os.PathLike, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (``N x rows x cols`` uint8) and labels (``N`` uint8) of ``<prefix>-images-idx3-ubyte[.gz]`` and
    ``<prefix>-labels-idx1-ubyte[.gz]`` under ``root``; checks magic numbers and that the counts agree."""
    img_path = find_idx_file(root, f"{prefix}-images-idx3-ubyte")
    lab_path = find_idx_file(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(img_path, IDX_IMAGES_MAGIC)
    labels = read_idx(lab_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DatasetError(f"{img_path} holds {len(images)} images but {lab_path} holds {len(labels)} labels; "
                           f"expected the same count")
    return images, labels


# ------------------------------------------------------------------------------------------------- loaders
def _resize_stack(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear (antialiased) resize of ``N x 1 x H x W`` float images, in chunks; keeps float32."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = [F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True) for i in range(0, len(images), chunk)]
    return torch.cat(out).clamp_(0.0, 1.0)


def load_digits_splits(cfg) -> tuple[TensorImageDataset, TensorImageDataset]:
    """scikit-learn's 1,797 8x8 digits, split stratified into train / val (``val_fraction``, ``split_seed``).

    Pixels (0..16) are scaled to [0, 1] and upsampled once to ``image_size``; stored as float32 ``N x 1 x S x S``
    (each split sorted by the original sample order).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    labels = torch.from_numpy(digits.target.astype(np.int64))
    images = _resize_stack(images, int(cfg.image_size))
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=float(cfg.val_fraction),
                                          stratify=digits.target, random_state=int(cfg.split_seed))
    classes = [str(c) for c in digits.target_names]
    train_idx, val_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(val_idx))
    make = lambda idx: TensorImageDataset(images[idx], labels[idx], classes, int(cfg.in_channels))  # noqa: E731
    return make(train_idx), make(val_idx)


def load_fashion_mnist_splits(cfg, preresize_budget: int = PRERESIZE_BUDGET_BYTES
                              ) -> tuple[TensorImageDataset, TensorImageDataset]:
    """Fashion-MNIST from IDX files: train = the 60k training split, val = the 10k test split.

    Kept as uint8 ``N x 1 x S x S``. When ``image_size`` differs from 28 the images are resized once at load time
    if the result fits ``preresize_budget`` bytes, otherwise per sample in ``__getitem__``.
    """
    root = Path(cfg.root or FASHION_MNIST_ROOT)
    if not root.is_dir():
        raise DatasetError(f"Fashion-MNIST root {root} does not exist: expected a folder holding "
                           f"train-images-idx3-ubyte.gz etc. (Debian package dataset-fashion-mnist, or set data.root)")
    size = int(cfg.image_size)
    out = []
    for prefix in ("train", "t10k"):
        images, labels = load_idx_split(root, prefix)
        x = torch.from_numpy(images)[:, None]
        output_size = None
        if tuple(x.shape[-2:]) != (size, size):
            if len(x) * size * size <= preresize_budget:
                x = torch.cat([(_resize_stack(x[i:i + 4096].float() / 255.0, size) * 255.0).round_().to(torch.uint8)
                               for i in range(0, len(x), 4096)])
            else:
                output_size = size
        out.append(TensorImageDataset(x, torch.from_numpy(labels.astype(np.int64)), FASHION_MNIST_CLASSES,
                                      int(cfg.in_channels), output_size=output_size))
    return out[0], out[1]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _images_under(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return found


def scan_split(split_dir: str | os.PathLike, class_to_idx: Optional[dict[str, int]] = None
               ) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted folder names) and ``(path, label)`` samples of one ImageNet-style split folder.

    With ``class_to_idx`` (the training classes) every class folder must be one of them.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DatasetError(f"split folder {split_dir} does not exist: expected <root>/train and <root>/val, "
                           f"each holding one sub-folder of images per class")
    classes = _class_dirs(split_dir)
    if not classes:
        raise DatasetError(f"split folder {split_dir} has no class folders: expected one sub-folder of images "
                           f"per class ({split_dir}/<class>/*.JPEG)")
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in classes:
        if c not in class_to_idx:
            raise DatasetError(f"class folder {split_dir / c} has no counterpart in the training split: expected "
                               f"only classes that the train/ folder has")
        files = _images_under(split_dir / c)
        if not files:
            raise DatasetError(f"class folder {split_dir / c} holds no images: expected files ending in "
                               f"{', '.join(IMG_EXTENSIONS)}")
        samples.extend((f, class_to_idx[c]) for f in files)
    return classes, samples


def load_imagefolder_splits(cfg) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """``root/train/<class>/*`` and ``root/val/<class>/*``; classes come from train/ (sorted)."""
    if not cfg.root:
        raise DatasetError("data.root is required for data.name=imagefolder (a folder holding train/ and val/)")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DatasetError(f"image-folder root {root} does not exist: expected a folder holding train/ and val/")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetError(f"image-folder root {root} has no {split}/ folder: expected {root / split}/<class>/*")
    classes, train_samples = scan_split(root / "train")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    _, val_samples = scan_split(root / "val", class_to_idx)
    ch = int(cfg.in_channels)
    decoder = getattr(cfg, "decoder", "pil")
    return (ImageFolderDataset(train_samples, classes, ch, root=str(root / "train"), decoder=decoder),
            ImageFolderDataset(val_samples, classes, ch, root=str(root / "val"), decoder=decoder))


def load_splits(cfg) -> tuple[Any, Any]:
    """``(train, val)`` datasets without transforms for ``cfg.name`` (subsets not applied)."""
    loaders = {"digits": load_digits_splits, "fashion_mnist": load_fashion_mnist_splits,
               "imagefolder": load_imagefolder_splits}
    if cfg.name not in loaders:
        raise DatasetError(f"data.name={cfg.name!r} is unknown: choose one of {sorted(loaders)}")
    return loaders[cfg.name](cfg)


def verify_images(root: str | os.PathLike) -> list[str]:
    """Fully decode every image file under ``root`` (recursively) and return the paths PIL cannot read, sorted.

    Meant to be run once on a new image folder (it opens every file, so it takes as long as an epoch of decoding).
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"folder {root} does not exist: expected a folder of images to verify")
    bad = []
    for path in _images_under(root):
        try:
            with Image.open(path) as img:
                img.load()
        except Exception:  # any decoding failure counts as unreadable
            bad.append(path)
    return sorted(bad)
