"""Tests of compress_lit.data: datasets, IDX parsing, transforms and the data module (CPU, a few seconds)."""
from __future__ import annotations

import gzip
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from compress_lit.runtime.config import DataConfig
from compress_lit.data import CompressDataModule, DatasetError, build_datamodule, verify_images
from compress_lit.data.datasets import (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, load_fashion_mnist_splits,
                                        load_idx_split, read_idx)
from compress_lit.data.transforms import MultiView, TensorAugment, eval_transform, train_transform

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
GREY = dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


def make_cfg(**kw):
    kw.setdefault("num_workers", 0)
    return OmegaConf.structured(DataConfig(**kw))


def unnormalise(x: torch.Tensor, cfg) -> torch.Tensor:
    return x * torch.tensor(list(cfg.std)).view(-1, 1, 1) + torch.tensor(list(cfg.mean)).view(-1, 1, 1)


@pytest.fixture(scope="module")
def sk_digits():
    from sklearn.datasets import load_digits

    return load_digits()


# --------------------------------------------------------------------------------------------------- digits
def test_digits_split_is_stratified_and_complete():
    dm = build_datamodule(make_cfg(name="digits", image_size=8, batch_size=32))
    dm.setup()
    assert dm.num_train + dm.num_val == 1797
    assert dm.num_val == 360  # ceil(0.2 * 1797)
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]
    train_labels = dm.train_dataset.labels
    val_labels = dm.val_dataset.labels
    assert set(train_labels.tolist()) == set(range(10)) == set(val_labels.tolist())
    # stratified: each class's share of val is close to val_fraction
    for c in range(10):
        n_val, n_all = int((val_labels == c).sum()), int((val_labels == c).sum() + (train_labels == c).sum())
        assert abs(n_val / n_all - 0.2) < 0.02
    # the split is a partition of the 1,797 images and is fixed by split_seed
    dm2 = build_datamodule(make_cfg(name="digits", image_size=8))
    assert torch.equal(dm2.val_dataset.images, dm.val_dataset.images)
    dm3 = build_datamodule(make_cfg(name="digits", image_size=8, split_seed=1))
    assert not torch.equal(dm3.val_dataset.images, dm.val_dataset.images)


def test_digits_shapes_normalisation_and_index(sk_digits):
    cfg = make_cfg(name="digits", image_size=8, **GREY)
    dm = build_datamodule(cfg)
    x, y, i = dm.val_dataset[5]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and isinstance(y, int) and i == 5
    raw = unnormalise(x, cfg)
    assert torch.equal(raw[0], raw[1]) and torch.equal(raw[0], raw[2])  # grey replicated
    # find the original image: at 8 px the un-normalised image is exactly load_digits' pixels / 16
    originals = torch.from_numpy(sk_digits.images / 16.0).float()
    matches = [k for k in range(len(originals)) if torch.allclose(originals[k], raw[0], atol=1e-5)]
    assert matches and any(int(sk_digits.target[k]) == y for k in matches)
    k = matches[0]
    assert float(raw.mean()) == pytest.approx(sk_digits.images[k].sum() / 16.0 / 64.0, abs=1e-6)

    # upsampled once at load time: 3 x 32 x 32, values in [0, 1] after un-normalising
    cfg32 = make_cfg(name="digits", image_size=32, **GREY)
    dm32 = build_datamodule(cfg32)
    x32, y32, _ = dm32.val_dataset[5]
    assert x32.shape == (3, 32, 32) and y32 == y
    raw32 = unnormalise(x32, cfg32)
    assert raw32.min() >= -1e-6 and raw32.max() <= 1 + 1e-6
    assert float(raw32.mean()) == pytest.approx(float(raw.mean()), abs=0.03)

    for ds in (dm32.train_dataset, dm32.train_dataset_eval, dm32.val_dataset):
        for j in (0, 7, len(ds) - 1):
            assert ds[j][2] == j
    # through the in-order loader the indices are 0..N-1
    idx = torch.cat([b[2] for b in dm32.train_eval_dataloader()])
    assert torch.equal(idx, torch.arange(dm32.num_train))
    labels = torch.cat([b[1] for b in dm32.val_dataloader()])
    assert torch.equal(labels, dm32.val_dataset.labels)


def test_train_loader_batches_and_views():
    dm = build_datamodule(make_cfg(name="digits", image_size=16, batch_size=64), views=2)
    loader = dm.train_dataloader()
    assert loader.drop_last and loader.batch_size == 64
    assert loader.pin_memory == torch.cuda.is_available()
    views, y, idx = next(iter(loader))
    assert isinstance(views, list) and len(views) == 2
    assert all(v.shape == (64, 3, 16, 16) for v in views)
    assert not torch.equal(views[0], views[1])
    assert y.shape == idx.shape == (64,)
    assert len(loader) == dm.num_train // 64


def test_train_subset_is_deterministic():
    def subset(seed):
        dm = build_datamodule(make_cfg(name="digits", image_size=8, train_subset=100, val_subset=50,
                                       split_seed=seed))
        dm.setup()
        return dm

    a, b, c = subset(0), subset(0), subset(3)
    assert a.num_train == 100 and a.num_val == 50
    assert torch.equal(a.train_dataset.images, b.train_dataset.images)
    assert torch.equal(a.train_dataset.labels, b.train_dataset.labels)
    assert not torch.equal(a.train_dataset.labels, c.train_dataset.labels)
    assert [a.train_dataset_eval[j][2] for j in range(100)] == list(range(100))
    # the subset is drawn from the full train split
    full = build_datamodule(make_cfg(name="digits", image_size=8)).train_dataset.images
    flat = full.flatten(1)
    assert all((flat == img.flatten()).all(1).any() for img in a.train_dataset.images[:10])


def test_batch_size_larger_than_dataset_names_key():
    dm = build_datamodule(make_cfg(name="digits", image_size=8, train_subset=10, batch_size=16))
    with pytest.raises(DatasetError, match=r"data\.batch_size=16"):
        dm.train_dataloader()


# ------------------------------------------------------------------------------------------------ transforms
def test_multiview_returns_different_views_of_same_image():
    cfg = make_cfg(name="digits", image_size=16, color_jitter=0.4, **GREY)
    dm = CompressDataModule(cfg, views=3)
    views, y, i = dm.train_dataset[11]
    assert isinstance(views, list) and len(views) == 3 and i == 11
    assert y == dm.train_dataset_eval[11][1]
    assert all(v.shape == (3, 16, 16) for v in views)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.equal(views[a], views[b])
    mv = MultiView(lambda x: x + torch.rand(1), 4)
    out = mv(torch.zeros(2))
    assert len(out) == 4 and len({float(o[0]) for o in out}) == 4


def test_tensor_transforms_fast_and_in_range():
    cfg = make_cfg(name="fashion_mnist", image_size=32, color_jitter=0.4, **GREY)
    aug, ev = train_transform(cfg), eval_transform(cfg)
    assert isinstance(aug, TensorAugment)
    x = torch.rand(1, 28, 28)
    out = aug(x)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    raw = unnormalise(out, cfg)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert torch.allclose(unnormalise(ev(x), cfg), x.expand(3, 28, 28), atol=1e-6)  # eval: normalise only
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(200):
            aug(x)
        best = min(best, (time.perf_counter() - t) / 200)
    assert best < 5e-4, f"TensorAugment takes {best * 1e6:.0f} us per 32 px image"


# ------------------------------------------------------------------------------------------------------- IDX
def write_idx(path: Path, arr: np.ndarray, magic: int, truncate: int = 0) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    data = data[:len(data) - truncate]
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_fashion(root: Path, n_train=12, n_test=5, gz=True, rng=np.random.default_rng(0)):
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labs = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", imgs, IDX_IMAGES_MAGIC)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labs, IDX_LABELS_MAGIC)
        arrays[prefix] = (imgs, labs)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    arrays = write_fashion(tmp_path, gz=gz)
    imgs, labs = load_idx_split(tmp_path, "train")
    assert imgs.dtype == np.uint8 and np.array_equal(imgs, arrays["train"][0])
    assert np.array_equal(labs, arrays["train"][1])

    # through the data module at the native size: uint8 in memory, 3 channels out, val = t10k
    cfg = make_cfg(name="fashion_mnist", root=str(tmp_path), image_size=28, batch_size=4, **GREY)
    dm = build_datamodule(cfg)
    assert dm.num_train == 12 and dm.num_val == 5 and dm.num_classes == 10
    assert dm.val_dataset.images.dtype == torch.uint8
    x, y, i = dm.val_dataset[2]
    assert x.shape == (3, 28, 28) and y == arrays["t10k"][1][2] and i == 2
    assert torch.allclose(unnormalise(x, cfg)[1], torch.from_numpy(arrays["t10k"][0][2]).float() / 255, atol=1e-5)


def test_fashion_resize_once_and_on_the_fly(tmp_path):
    write_fashion(tmp_path)
    cfg = make_cfg(name="fashion_mnist", root=str(tmp_path), image_size=32, **GREY)
    once_train, _ = load_fashion_mnist_splits(cfg)
    lazy_train, _ = load_fashion_mnist_splits(cfg, preresize_budget=0)
    assert once_train.images.shape == (12, 1, 32, 32) and once_train.images.dtype == torch.uint8
    assert lazy_train.images.shape == (12, 1, 28, 28)
    a, b = once_train[3][0], lazy_train[3][0]
    assert a.shape == b.shape == (3, 32, 32)
    assert (a - b).abs().max() <= 1 / 255 + 1e-6  # equal up to uint8 rounding


def test_idx_errors_name_the_file(tmp_path):
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    bad_magic = tmp_path / "bad-magic-idx3-ubyte"
    write_idx(bad_magic, arr, IDX_LABELS_MAGIC)
    with pytest.raises(DatasetError, match=r"bad-magic-idx3-ubyte.*0x00000801.*expected 0x00000803"):
        read_idx(bad_magic, IDX_IMAGES_MAGIC)

    truncated = tmp_path / "short-idx3-ubyte.gz"
    write_idx(truncated, arr, IDX_IMAGES_MAGIC, truncate=5)
    with pytest.raises(DatasetError, match=r"short-idx3-ubyte\.gz is truncated"):
        read_idx(truncated, IDX_IMAGES_MAGIC)

    header_only = tmp_path / "header-idx3-ubyte"
    header_only.write_bytes(struct.pack(">II", IDX_IMAGES_MAGIC, 2))
    with pytest.raises(DatasetError, match=r"header-idx3-ubyte is truncated"):
        read_idx(header_only, IDX_IMAGES_MAGIC)

    broken_gz = tmp_path / "broken-idx1-ubyte.gz"
    broken_gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 100)[:-12])
    with pytest.raises(DatasetError, match=r"broken-idx1-ubyte\.gz"):
        read_idx(broken_gz, IDX_LABELS_MAGIC)

    # count mismatch between images and labels
    root = tmp_path / "mismatch"
    write_fashion(root)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(7, np.uint8), IDX_LABELS_MAGIC)
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz holds 12 images.*"
                                           r"train-labels-idx1-ubyte\.gz holds 7 labels"):
        load_idx_split(root, "train")

    # a missing file is named (both accepted spellings)
    root = tmp_path / "missing"
    write_fashion(root)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz or .*t10k-labels-idx1-ubyte"):
        build_datamodule(make_cfg(name="fashion_mnist", root=str(root), image_size=28)).setup()

    with pytest.raises(DatasetError, match=r"does-not-exist"):
        build_datamodule(make_cfg(name="fashion_mnist", root=str(tmp_path / "does-not-exist"))).setup()


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_labels():
    for prefix, n in (("train", 60000), ("t10k", 10000)):
        path = FASHION_ROOT / f"{prefix}-labels-idx1-ubyte.gz"
        if not path.exists():
            path = FASHION_ROOT / f"{prefix}-labels-idx1-ubyte"
        labels = read_idx(path, IDX_LABELS_MAGIC)
        assert labels.shape == (n,) and labels.max() == 9
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        assert list(labels[:20]) == list(raw[8:28])
        assert np.bincount(labels).tolist() == [n // 10] * 10  # Fashion-MNIST is balanced


# ----------------------------------------------------------------------------------------------- imagefolder
def make_tree(root: Path, train=("cat", "dog"), val=("cat", "dog"), n=3) -> None:
    from PIL import Image

    colours = {"cat": (200, 30, 30), "dog": (30, 30, 200), "emu": (30, 200, 30)}
    for split, classes in (("train", train), ("val", val)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (20 + 4 * k, 16), colours[c]).save(d / f"img{k}.JPEG")


def test_imagefolder_labels_indices_shapes(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    cfg = make_cfg(name="imagefolder", root=str(tmp_path), image_size=8, resize_size=10, batch_size=2, **GREY)
    dm = build_datamodule(cfg)
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    assert dm.num_train == 6 and dm.num_val == 6
    assert dm.train_dataset.labels.tolist() == [0, 0, 0, 1, 1, 1]
    for ds in (dm.train_dataset, dm.train_dataset_eval, dm.val_dataset):
        for j in range(len(ds)):
            x, y, i = ds[j]
            assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and i == j and y == j // 3
    # eval transform: a uniformly red JPEG stays (nearly) red after Resize + CenterCrop
    raw = unnormalise(dm.val_dataset[0][0], cfg)
    assert raw[0].mean() > 0.7 and raw[2].mean() < 0.2
    views, y, idx = next(iter(CompressDataModule(cfg, views=2).train_dataloader()))
    assert len(views) == 2 and views[0].shape == (2, 3, 8, 8) and y.shape == idx.shape == (2,)
    assert verify_images(tmp_path) == []


def test_imagefolder_errors(tmp_path):
    def setup(root):
        build_datamodule(make_cfg(name="imagefolder", root=str(root), image_size=8, resize_size=10)).setup()

    with pytest.raises(DatasetError, match=r"nowhere.*does not exist"):
        setup(tmp_path / "nowhere")

    no_train = tmp_path / "no_train"
    (no_train / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no_train has no train/ folder"):
        setup(no_train)

    no_classes = tmp_path / "no_classes"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "val").mkdir()
    with pytest.raises(DatasetError, match=r"no_classes/train has no class folders"):
        setup(no_classes)

    empty_class = tmp_path / "empty_class"
    make_tree(empty_class)
    (empty_class / "train" / "zebra").mkdir()
    with pytest.raises(DatasetError, match=r"empty_class/train/zebra holds no images"):
        setup(empty_class)

    extra_val = tmp_path / "extra_val"
    make_tree(extra_val, val=("cat", "emu"))
    with pytest.raises(DatasetError, match=r"extra_val/val/emu has no counterpart in the training split"):
        setup(extra_val)


def test_corrupt_jpeg_is_named(tmp_path):
    make_tree(tmp_path)
    bad = tmp_path / "train" / "dog" / "img1.JPEG"
    bad.write_bytes(b"this is not a jpeg" * 10)
    truncated = tmp_path / "val" / "cat" / "img2.JPEG"
    truncated.write_bytes(truncated.read_bytes()[:200])
    dm = build_datamodule(make_cfg(name="imagefolder", root=str(tmp_path), image_size=8, resize_size=10))
    dm.setup()  # files are not opened up front
    j = [p for p, _ in dm.train_dataset.samples].index(str(bad))
    with pytest.raises(DatasetError, match=r"cannot read image .*dog/img1\.JPEG"):
        dm.train_dataset[j]
    with pytest.raises(DatasetError, match=r"dog/img1\.JPEG"):
        next(iter(dm.train_eval_dataloader()))  # also when collated through a loader
    assert verify_images(tmp_path) == sorted([str(bad), str(truncated)])
