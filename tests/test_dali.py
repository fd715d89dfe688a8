"""data.loader=dali: NVIDIA DALI's pipelines (data/dali_pipelines.py, data/dali_loader.py) against the torch loader,
on this machine's CPU (DALI's CPU mode: decoding with libjpeg-turbo through nvImageCodec).

Every number is checked against an independent reference: the torch DataLoader with Lightning's DistributedSampler
(order, labels, indices, sharding), torchvision's RandomResizedCrop on PIL images (crop geometry, measured from
images whose pixels encode their coordinates, compared with a two-sample Kolmogorov-Smirnov test), the torch
evaluation transform (pixels) and the torch MoCo v2 transform plus its nominal probabilities (the rates of jitter,
grayscale, blur and flip, detected from the pixels). The DALI tests skip, naming the reason, where DALI cannot be
imported (``make install`` installs it: the extra ``[dali]``); the configuration checks run everywhere.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from compress_lit.runtime.config import ConfigError, DataConfig, validate_pretrain, validate_train
from compress_lit.data import DatasetError, build_datamodule
from compress_lit.data.dali_loader import DaliLoader, dali_problem
from compress_lit.data.dali_pipelines import DaliSpec
from compress_lit.data.datasets import ImageFolderDataset

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "compress_lit"
CONF = str(ROOT / "conf")
PROBLEM = dali_problem()
needs_dali = pytest.mark.skipif(PROBLEM is not None, reason=f"DALI unavailable: {PROBLEM}")
GREY = dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


# ------------------------------------------------------------------------------------------------- helpers
def photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like ``H x W x 3`` uint8 image: a smooth colour field, a finer texture and pixel noise."""
    from PIL import Image

    def field(h, w, resample):
        small = rng.uniform(0, 255, (h, w, 3)).astype(np.uint8)
        return np.asarray(Image.fromarray(small).resize((width, height), resample), dtype=np.float32)

    img = 0.75 * field(3, 4, Image.BICUBIC) + 0.25 * field(9, 12, Image.BILINEAR) + rng.normal(0, 6, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


SIZES = ((53, 40), (37, 61), (48, 48), (90, 64), (41, 70), (64, 45))  # landscape, portrait, square, odd sizes


def make_tree(root: Path, n_train: int = 24, n_val: int = 6, classes: int = 3, seed: int = 0) -> Path:
    """``root/train/c<k>/*.jpg`` and ``root/val/c<k>/*.jpg``, photo-like JPEGs of the SIZES, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = SIZES[i % len(SIZES)]
            Image.fromarray(photo(rng, w, h)).save(folder / f"img{i:03d}.jpg", quality=90)
    return root


def data_cfg(root, **kw):
    kw = {"name": "imagefolder", "root": str(root), "image_size": 16, "resize_size": 20, "batch_size": 4,
          "eval_batch_size": 4, "num_workers": 1, "loader": "dali", **GREY, **kw}
    return OmegaConf.structured(DataConfig(**kw))


def torch_cfg(cfg):
    return OmegaConf.merge(cfg, {"loader": "torch", "num_workers": 0})


def to_pixels(x: torch.Tensor, cfg) -> torch.Tensor:
    """Normalised ``N x 3 x H x W`` batch -> float pixel values 0..255."""
    std = torch.tensor(list(cfg.std)).view(1, -1, 1, 1)
    mean = torch.tensor(list(cfg.mean)).view(1, -1, 1, 1)
    return (x * std + mean) * 255.0


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("dali_tree"))


# ------------------------------------------------------------------------------------------ configuration
def _train_cfg(*overrides):
    from hydra import compose, initialize_config_dir

    from compress_lit.runtime.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("data", ["digits", "fashion_mnist"])
def test_dali_with_tensor_datasets_is_refused_naming_the_key(data):
    with pytest.raises(ConfigError, match=rf"^data\.loader=dali reads image folders .*data\.name={data}"):
        validate_train(_train_cfg(f"data={data}", "data.loader=dali"))


def test_dali_missing_or_misconfigured_is_one_config_error(monkeypatch):
    base = ("data=imagenet", "data.root=/data/imagenet", "data.loader=dali")
    import compress_lit.data.dali_loader as dl

    monkeypatch.setattr(dl, "dali_problem", lambda: "NVIDIA DALI cannot be imported (ModuleNotFoundError: No "
                                                    "module named 'nvidia.dali'); install it with ...")
    with pytest.raises(ConfigError, match=r"^data\.loader=dali: NVIDIA DALI cannot be imported"):
        validate_train(_train_cfg(*base))
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        pre = compose(config_name="pretrain", overrides=["pretrain_experiment=demo_teacher", *base])
    with pytest.raises(ConfigError, match=r"^data\.loader=dali: NVIDIA DALI"):
        validate_pretrain(pre)  # MoCo from scratch too
    monkeypatch.setattr(dl, "dali_problem", lambda: None)
    validate_train(_train_cfg(*base))
    with pytest.raises(ConfigError, match=r"^data\.loader='gpu' is invalid"):
        validate_train(_train_cfg("data.loader=gpu"))
    with pytest.raises(ConfigError, match=r"data\.in_channels=1 needs data\.loader=torch"):
        validate_train(_train_cfg(*base, "data.in_channels=1", "data.mean=[0.5]", "data.std=[0.2]"))
    with pytest.raises(ConfigError, match=r"^teacher\.cache_views=4 .*data\.loader=dali"):
        validate_train(_train_cfg(*base, "teacher.cached=true", "teacher.cache_views=4"))
    validate_train(_train_cfg(*base, "teacher.cached=true"))  # the paper's cache (centre crop): fine


def test_evaluating_a_dali_checkpoint_without_dali_falls_back_to_the_torch_loader(monkeypatch, caplog):
    """A student trained with data.loader=dali records it; evaluate / linear / export on a machine without DALI
    use the torch loader (saying so); asking for data.loader=dali there is one ConfigError."""
    import compress_lit.data.dali_loader as dl
    from compress_lit.evaluation.loading import resolve_data_config

    monkeypatch.setattr(dl, "dali_problem", lambda: "NVIDIA DALI cannot be imported (ModuleNotFoundError)")
    recorded = {"name": "imagefolder", "root": "/data/imagenet", "loader": "dali"}
    with caplog.at_level("WARNING"):
        assert resolve_data_config(recorded, None).loader == "torch"
    assert "evaluating with data.loader=torch" in caplog.text
    with pytest.raises(ConfigError, match=r"^data\.loader=dali: NVIDIA DALI cannot be imported"):
        resolve_data_config(recorded, {"loader": "dali"})
    with pytest.raises(ConfigError, match=r"^data\.loader=dali reads image folders"):
        resolve_data_config({"name": "digits"}, {"loader": "dali"})
    monkeypatch.setattr(dl, "dali_problem", lambda: None)
    assert resolve_data_config(recorded, None).loader == "dali"  # with DALI here, the checkpoint's loader


def test_nothing_outside_the_dali_modules_imports_dali():
    """``nvidia.dali`` is imported lazily, inside functions of the two DALI modules only."""
    allowed = {SRC / "data" / "dali_loader.py", SRC / "data" / "dali_pipelines.py"}
    for path in SRC.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"^\s*(import nvidia\.dali|from nvidia\.dali|from nvidia import dali)", line):
                assert path in allowed, f"{path}:{n} imports DALI"
                assert line.startswith(" "), f"{path}:{n} imports DALI at module level"


def test_cli_refuses_dali_for_digits_in_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", COMPRESS_LIT_CACHE=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "compress_lit.train", "data=digits", "data.loader=dali",
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith(
        "compress_lit.train: ConfigError: data.loader=dali reads image folders")
    assert "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------ order, labels, indices
def _torch_reference(dataset, batch: int, rank: int, world: int, seed: int, epoch: int):
    """What a torch loader under Lightning's DDP reads: DistributedSampler(shuffle, seed) + drop_last batches."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True)
    return [(y, i) for _, y, i in loader]


@needs_dali
def test_labels_and_indices_equal_the_torch_loaders(tree):
    cfg = data_cfg(tree, batch_size=8)
    dm = build_datamodule(cfg, views=2, channels_last=True)
    dm.setup()
    classes = dm.class_names
    for world, rank in ((1, 0), (2, 0), (2, 1)):  # one process, and both ranks of two (data.batch_size is global)
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        loader = dm.train_dataloader()
        assert isinstance(loader, DaliLoader) and loader.batch_size == 8 // world
        assert len(loader) == (24 // world) // (8 // world)
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)  # what Lightning calls each epoch
            batches = list(loader)
            ref = _torch_reference(dm.train_dataset_eval, 8 // world, rank, world, loader.seed, epoch)
            assert len(batches) == len(ref) == len(loader)
            for (views, y, idx), (ry, ridx) in zip(batches, ref):
                assert torch.equal(idx, ridx) and torch.equal(y, ry)
                assert y.dtype == idx.dtype == torch.int64
                # the label is the class folder of the file (independent of both loaders' bookkeeping)
                assert [classes.index(Path(dm.train_dataset.samples[i][0]).parent.name) for i in idx] == y.tolist()
                assert isinstance(views, list) and len(views) == 2
                for v in views:
                    assert v.shape == (8 // world, 3, 16, 16) and v.dtype == torch.float32
                    assert v.is_contiguous(memory_format=torch.channels_last)  # perf.channels_last
                assert not torch.equal(views[0], views[1])
    # the evaluation loaders: every sample once, in index order, the last batch partial; NCHW without channels_last
    dm = build_datamodule(data_cfg(tree, eval_batch_size=4))
    for loader, ds in ((dm.val_dataloader(), dm.val_dataset), (dm.train_eval_dataloader(), dm.train_dataset_eval),
                       (dm.bank_dataloader(), dm.bank_dataset)):
        assert isinstance(loader, DaliLoader) and len(loader) == -(-len(ds) // 4)
        got = list(loader)
        assert torch.equal(torch.cat([b[2] for b in got]), torch.arange(len(ds)))
        assert torch.equal(torch.cat([b[1] for b in got]), ds.labels)
        assert all(b[0].is_contiguous() and b[0].shape[1:] == (3, 16, 16) for b in got)


@needs_dali
def test_two_shards_read_every_image_once_per_epoch(tree):
    dm = build_datamodule(data_cfg(tree, batch_size=8))
    dm.setup()
    orders = {}
    for epoch in (0, 1, 2):
        seen = Counter()
        for rank in (0, 1):
            dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
            loader = dm.train_dataloader()
            loader.sampler.set_epoch(epoch)
            part = [int(i) for _, _, idx in loader for i in idx]
            assert len(part) == 12  # 24 images, 2 processes, 4 each per batch: 3 batches each
            seen.update(part)
            orders[epoch, rank] = part
        assert seen == Counter(range(24))  # every image exactly once per epoch over the two shards
    assert orders[0, 0] != orders[1, 0] != orders[2, 0]  # a new order each epoch
    # 26 images: ceil(26 / 2) = 13 per process, 3 whole batches of 4: 2 images wait for the next epoch (torch's rule)
    odd = ImageFolderDataset(dm.train_dataset.samples + dm.train_dataset.samples[:2], dm.class_names)
    spec = DaliSpec.from_config(data_cfg(tree))
    seen = Counter()
    for rank in (0, 1):
        loader = DaliLoader(odd, spec, train=True, batch_size=4, rank=rank, world_size=2, seed=5)
        got = [(y, i) for _, y, i in loader]
        ref = _torch_reference(odd.with_transform(lambda img: 0), 4, rank, 2, 5, 0)
        assert [i.tolist() for _, i in got] == [i.tolist() for _, i in ref]
        seen.update(int(i) for _, idx in got for i in idx)
    assert sum(seen.values()) == 24 and max(seen.values()) == 1


# ------------------------------------------------------------------------------------------------ crop geometry
CODE_W, CODE_H, CROP = 256, 192, 32


@pytest.fixture(scope="module")
def coordinate_png(tmp_path_factory):
    """A 256 x 192 PNG whose red value is the pixel's column and green value its row (scaled to 0..255)."""
    from PIL import Image

    x = np.broadcast_to(np.arange(CODE_W, dtype=np.float64)[None, :], (CODE_H, CODE_W))
    y = np.broadcast_to(np.arange(CODE_H, dtype=np.float64)[:, None] * 255 / (CODE_H - 1), (CODE_H, CODE_W))
    rgb = np.stack([x, np.rint(y), np.full_like(x, 128)], -1).astype(np.uint8)
    path = tmp_path_factory.mktemp("coords") / "coords.png"
    Image.fromarray(rgb).save(path)
    return path


def crop_geometry(pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Area fraction and aspect ratio (w / h) of the crops behind ``N x 3 x S x S`` outputs (pixel values) of the
    coordinate image: a straight line fitted to the red (column) and green (row) values along the interior of the
    output gives input pixels per output pixel, hence the crop's width and height (resampling keeps a linear ramp
    linear away from the borders)."""
    s = pixels.shape[-1]
    t = torch.arange(s, dtype=torch.float64)[3:-3]
    t = t - t.mean()

    def slope(profile):  # N x S -> least-squares slope over the interior
        p = profile[:, 3:-3].double()
        return ((p - p.mean(1, keepdim=True)) * t).sum(1) / (t * t).sum()

    w = slope(pixels[:, 0].mean(1)).abs() * s  # red: 1 level per input column
    h = slope(pixels[:, 1].mean(2)).abs() * s * (CODE_H - 1) / 255  # green: 255 / 191 levels per input row
    return (w * h / (CODE_W * CODE_H)).numpy(), (w / h).numpy()


def dali_crops(path: Path, scale, views: int, n: int) -> torch.Tensor:
    cfg = data_cfg("/unused", image_size=CROP, crop_scale=list(scale), hflip=False, mean=[0.0] * 3, std=[1.0] * 3)
    ds = ImageFolderDataset([(str(path), 0)] * n, ["c"])
    loader = DaliLoader(ds, DaliSpec.from_config(cfg, views=views), train=True, batch_size=100, seed=1)
    out = [torch.cat(v) if views > 1 else v for v, _, _ in loader]
    return torch.cat(out) * 255.0


def torchvision_crops(path: Path, scale, n: int) -> torch.Tensor:
    import torchvision.transforms as T
    from PIL import Image

    torch.manual_seed(0)
    img = Image.open(path).convert("RGB")
    rrc = T.Compose([T.RandomResizedCrop(CROP, scale=tuple(scale)), T.PILToTensor()])
    return torch.stack([rrc(img) for _ in range(n)]).float()


@needs_dali
@pytest.mark.parametrize("views", [1, 2])  # 1: region-of-interest decode; 2: decoded once, cropped twice
def test_crop_geometry_matches_torchvisions_random_resized_crop(coordinate_png, views):
    from scipy.stats import ks_2samp

    n = 2000
    ref_area, ref_ratio = crop_geometry(torchvision_crops(coordinate_png, (0.08, 1.0), n))
    area, ratio = crop_geometry(dali_crops(coordinate_png, (0.08, 1.0), views, n // views))
    assert len(area) == n
    # the estimator itself: torchvision's crops span the configured range
    assert 0.07 < ref_area.min() and ref_area.max() <= 1.01 and 0.74 < ref_ratio.min() and ref_ratio.max() < 1.35
    p_area, p_ratio = ks_2samp(area, ref_area).pvalue, ks_2samp(np.log(ratio), np.log(ref_ratio)).pvalue
    assert p_area > 1e-3 and p_ratio > 1e-3, (p_area, p_ratio)
    # a wrong crop_scale is caught by the same test
    wrong, _ = crop_geometry(dali_crops(coordinate_png, (0.25, 1.0), views, n // views))
    assert ks_2samp(wrong, ref_area).pvalue < 1e-6
    print(f"views={views}: KS p area {p_area:.3f}, aspect {p_ratio:.3f}")


# ------------------------------------------------------------------------------------- evaluation pixels, bad input
EVAL_TOLERANCE = 1.0  # grey levels (of 255): the largest |DALI - torch| of any pixel of any image, measured: 1


@pytest.fixture(scope="module")
def formats_tree(tmp_path_factory):
    """Photo-like images of many shapes (down- and upscaled to the 40 px short side) and the formats an ImageNet-style
    tree holds besides colour JPEGs: PNG (RGB, RGBA, palette), a CMYK JPEG and a greyscale JPEG."""
    from PIL import Image

    root = tmp_path_factory.mktemp("formats")
    rng = np.random.default_rng(1)
    files = {}
    for k, (w, h) in enumerate([(160, 120), (120, 160), (97, 131), (250, 167), (41, 70), (64, 45), (77, 77)]):
        files[f"photo{k}.jpg"] = (Image.fromarray(photo(rng, w, h)), {"quality": 92})
    base = Image.fromarray(photo(rng, 90, 70))
    files["rgb.png"] = (base, {})
    files["rgba.png"] = (base.convert("RGBA"), {})
    files["palette.png"] = (base.convert("P"), {})
    files["cmyk.jpg"] = (base.convert("CMYK"), {"quality": 95})
    files["grey.jpg"] = (base.convert("L"), {"quality": 95})
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        for name, (img, kw) in files.items():
            img.save(root / split / "a" / name, **kw)
    return root


@needs_dali
def test_evaluation_pixels_match_the_torch_loaders(formats_tree):
    cfg = data_cfg(formats_tree, image_size=32, resize_size=40, eval_batch_size=5)
    dali = torch.cat([x for x, _, _ in build_datamodule(cfg).val_dataloader()])
    ref_ds = build_datamodule(torch_cfg(cfg)).val_dataset
    ref = torch.stack([ref_ds[i][0] for i in range(len(ref_ds))])
    diff = (to_pixels(dali, cfg) - to_pixels(ref, cfg)).abs()
    names = [Path(p).name for p, _ in ref_ds.samples]
    worst = {n: round(float(d.max()), 3) for n, d in zip(names, diff)}
    assert max(worst.values()) <= EVAL_TOLERANCE + 1e-3, worst
    assert float(diff.mean()) < 0.3, float(diff.mean())
    print(f"eval |DALI - torch|: max {max(worst.values()):.3f}, mean {float(diff.mean()):.3f} grey levels; {worst}")


@needs_dali
def test_a_corrupt_or_truncated_file_is_named_as_the_torch_loader_names_it(tmp_path):
    root = make_tree(tmp_path / "tree", n_train=8, n_val=4, classes=2)
    bad = root / "train" / "c1" / "img003.jpg"
    bad.write_bytes(b"this is not a jpeg" * 10)
    truncated = root / "val" / "c0" / "img002.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    cfg = data_cfg(root, batch_size=4)
    torch_dm = build_datamodule(torch_cfg(cfg))
    j = [p for p, _ in torch_dm.train_dataset.samples].index(str(bad))
    with pytest.raises(DatasetError) as torch_error:
        torch_dm.train_dataset[j]
    dm = build_datamodule(cfg)
    with pytest.raises(DatasetError) as dali_error:
        for _ in dm.train_dataloader():  # the corrupt file is in one of the two batches
            pass
    assert str(dali_error.value) == str(torch_error.value)  # the torch loader's message, naming the file
    assert str(bad) in str(dali_error.value)
    with pytest.raises(DatasetError, match=rf"cannot read image {re.escape(str(truncated))}"):
        list(dm.val_dataloader())
    with pytest.raises(DatasetError, match=re.escape(str(truncated))):
        list(torch_dm.val_dataloader())  # what the torch loader does with it
    # a file DALI cannot decode although PIL can (PIL stood in for here): named, with DALI's reason and the way out
    loader = dm.val_dataloader()
    loader.dataset.load_image = lambda i: None
    with pytest.raises(DatasetError, match=rf"^DALI cannot decode {re.escape(str(truncated))}, which PIL reads "
                                           r"\(.+\): convert the file to JPEG or PNG, or use data.loader=torch$"):
        list(loader)
    # the feature caches of the evaluation tell DALI's pixels from the torch loader's
    from compress_lit.evaluation.features import describe_loader

    assert describe_loader(loader)["loader"].startswith("dali:eval:")
    assert "loader" not in describe_loader(torch_dm.val_dataloader())


# ---------------------------------------------------------------------------------------------- MoCo v2 rates
MOCO_S = 96


@pytest.fixture(scope="module")
def moco_png(tmp_path_factory):
    """A 96 x 96 PNG: a colour (120, 95, 80), brighter on the left half than on the right (+-22 grey levels), with a
    one-pixel checkerboard (+-14) on top. Colour jitter moves its mean colour, grayscale equalises its channels, a
    blur flattens the checkerboard but not the halves, a flip swaps the halves: each detectable on its own, since
    the grey modulations pass every colour operation unchanged (up to clamping, which these values avoid)."""
    from PIL import Image

    yy, xx = np.mgrid[0:MOCO_S, 0:MOCO_S]
    lum = np.where(xx < MOCO_S // 2, 22.0, -22.0) + np.where((xx + yy) % 2 == 0, 14.0, -14.0)
    img = np.clip(np.array([120.0, 95.0, 80.0])[None, None] + lum[..., None], 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("moco") / "moco.png"
    Image.fromarray(img).save(path)
    return path, torch.from_numpy(img).permute(2, 0, 1).float()


def moco_events(x: torch.Tensor, original: torch.Tensor) -> dict[str, np.ndarray]:
    """Per image of ``N x 3 x S x S`` pixel values: grayscale, jitter (among the colour images), blur, flip."""
    luma = lambda t: (t * torch.tensor([0.299, 0.587, 0.114]).view(-1, 3, 1, 1)).sum(-3)  # noqa: E731
    s = x.shape[-1]
    lo, hi = slice(4, s // 2 - 4), slice(s // 2 + 4, s - 4)
    checker = torch.tensor(np.where(np.add.outer(np.arange(s), np.arange(s)) % 2 == 0, 1.0, -1.0)).float()

    def ratio(t):  # checkerboard amplitude over the halves' contrast
        lum = luma(t)
        inner = (lum * checker)[..., 4:-4, 4:-4].mean((-2, -1)).abs()
        halves = lum[..., 4:-4, lo].mean((-2, -1)) - lum[..., 4:-4, hi].mean((-2, -1))
        return inner / halves.abs(), halves

    r0, _ = ratio(original[None])
    r, halves = ratio(x)
    grey = (x.amax(1) - x.amin(1)).flatten(1).amax(1) <= 3.0
    moved = (x.mean((-2, -1)) - original.mean((-2, -1))).abs().amax(1) > 3.0
    return {"grayscale": grey.numpy(), "jitter": moved[~grey].numpy(), "blur": (r < 0.75 * r0).numpy(),
            "flip": (halves < 0).numpy()}


@needs_dali
def test_mocov2_probabilities_match_the_torch_transform(moco_png):
    from PIL import Image

    from compress_lit.data.transforms import train_transform

    path, original = moco_png
    n = 1500
    cfg = data_cfg("/unused", image_size=MOCO_S, crop_scale=[1.0, 1.0], augment="mocov2", mean=[0.0] * 3,
                   std=[1.0] * 3)  # crop_scale 1: the crop is the whole image (checked below)
    loader = DaliLoader(ImageFolderDataset([(str(path), 0)] * n, ["c"]), DaliSpec.from_config(cfg), train=True,
                        batch_size=100, seed=2)
    dali = torch.cat([x for x, _, _ in loader]) * 255.0
    assert float((dali - original).abs().flatten(1).amax(1).min()) < 1e-3  # untouched images: the crop is the image
    torch.manual_seed(0)
    t = train_transform(torch_cfg(cfg))
    img = Image.open(path).convert("RGB")
    ref = torch.stack([t(img) for _ in range(n)]) * 255.0
    got, want = moco_events(dali, original), moco_events(ref, original)
    nominal = {"grayscale": 0.2, "flip": 0.5, "jitter": 0.8}
    for event in ("grayscale", "jitter", "blur", "flip"):
        p, q = got[event].mean(), want[event].mean()
        k, m = len(got[event]), len(want[event])
        pooled = (p * k + q * m) / (k + m)
        se = np.sqrt(pooled * (1 - pooled) * (1 / k + 1 / m))
        assert abs(p - q) < 4.5 * se, (event, p, q)  # the same rate as the torch transform's
        if event in nominal:  # and the nominal probability (binomial tolerance)
            assert abs(p - nominal[event]) < 4.5 * np.sqrt(nominal[event] * (1 - nominal[event]) / k), (event, p)
        print(f"{event}: DALI {p:.3f} (n {k}), torch {q:.3f} (n {m}), nominal {nominal.get(event, '-')}")
    assert 0.15 < got["blur"].mean() < 0.5  # the blur detector sees the larger sigmas of the 50% blurred


# ------------------------------------------------------------------------------------------------------ resume
@needs_dali
def test_resume_mid_epoch_continues_with_the_images_not_yet_seen(tree):
    spec = DaliSpec.from_config(data_cfg(tree))
    ds = build_datamodule(data_cfg(tree)).train_dataset
    full = DaliLoader(ds, spec, train=True, batch_size=4, seed=3)
    full.sampler.set_epoch(1)
    reference = [b[2].tolist() for b in full]
    first = DaliLoader(ds, spec, train=True, batch_size=4, seed=3)
    first.sampler.set_epoch(1)
    it = iter(first)
    done = [next(it)[2].tolist() for _ in range(2)]
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 2
    resumed = DaliLoader(ds, spec, train=True, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    assert done + [b[2].tolist() for b in resumed] == reference  # the rest of the epoch, in its order
    resumed.sampler.set_epoch(2)
    assert len(list(resumed)) == len(resumed)  # the next epoch is whole again
    # an epoch's augmentations depend on (seed, epoch, rank) only, not on the epochs before or the thread count:
    # a resume from an end-of-epoch checkpoint gives the uninterrupted run's pixels
    mocov2 = DaliSpec.from_config(data_cfg(tree, augment="mocov2"), views=2)
    ran_before = DaliLoader(ds, mocov2, train=True, batch_size=4, seed=3, num_threads=1)
    for epoch in (0, 1):
        ran_before.sampler.set_epoch(epoch)
        after = [b[0] for b in ran_before]
    fresh = DaliLoader(ds, mocov2, train=True, batch_size=4, seed=3, num_threads=2)
    fresh.sampler.set_epoch(1)
    again = [b[0] for b in fresh]
    assert len(again) == len(after) == len(fresh)
    assert all(torch.equal(u, v) for a, b in zip(after, again) for u, v in zip(a, b))
    # an end-of-epoch position leaves the next epoch whole; another world size restarts the epoch
    for saved in ({**state, "batches": len(full)}, {**state, "world_size": 2}):
        again = DaliLoader(ds, spec, train=True, batch_size=4, seed=3)
        again.load_state_dict(saved)
        again.sampler.set_epoch(2 if saved["batches"] == len(full) else 1)
        assert len(list(again)) == len(full)


class _Recorder:
    """A LightningModule that records the dataset indices of its training batches."""

    def __new__(cls):
        import pytorch_lightning as pl

        class Recorder(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))
                self.seen: list[list[int]] = []

            def training_step(self, batch, batch_idx):
                x, _, idx = batch
                self.seen.append(idx.tolist())
                return (self.w * x.mean()).sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        return Recorder()


@needs_dali
def test_lightning_checkpoint_mid_epoch_resumes_the_loader(tree, tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    spec = DaliSpec.from_config(data_cfg(tree))
    ds = build_datamodule(data_cfg(tree)).train_dataset
    kw = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False)
    ref = DaliLoader(ds, spec, train=True, batch_size=4, seed=3)  # 6 batches per epoch
    expected = []
    for epoch in (0, 1):
        ref.sampler.set_epoch(epoch)
        expected += [b[2].tolist() for b in ref]
    stopped = _Recorder()  # a checkpoint after step 8 (2 batches into epoch 1), as a requeue signal or SIGTERM saves
    save = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1, filename="mid")
    pl.Trainer(max_steps=9, callbacks=[save], **{**kw, "enable_checkpointing": True}).fit(
        stopped, DaliLoader(ds, spec, train=True, batch_size=4, seed=3))
    ckpt = tmp_path / "mid.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 8
    state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state[0]["epoch"] == 1 and state[0]["batches"] == 2
    resumed = _Recorder()
    pl.Trainer(max_epochs=2, **kw).fit(resumed, DaliLoader(ds, spec, train=True, batch_size=4, seed=3),
                                       ckpt_path=ckpt)
    assert stopped.seen[:8] + resumed.seen == expected  # every batch once, in the uninterrupted order


# ---------------------------------------------------------------------------------------------- end to end
TINY = ["data=imagenet", "data.loader=dali", "trainer=cpu", "teacher.format=random", "teacher.checkpoint=null",
        "teacher.width_multiplier=0.25", "student.width_multiplier=0.125", "data.image_size=32",
        "data.resize_size=36", "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=1",
        "method.queue_size=32", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1", "logger.flush_every_n_steps=1"]


def _train(tmp_path, tree, *extra):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", COMPRESS_LIT_CACHE=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "compress_lit.train", *TINY, f"data.root={tree}", *extra,
                        f"hydra.run.dir={run}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    import csv

    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    losses = {int(r["epoch"]): float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")}
    steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    return run, losses, steps, p.stdout + p.stderr


@needs_dali
def test_compress_2q_trains_and_evaluates_through_dali(tmp_path, tree):
    run, losses, steps, out = _train(tmp_path, tree, "optim.epochs=2", "eval.linear=false", "eval.cluster_seeds=1",
                                     "eval.random_baseline=false", "eval.include_teacher=false")
    assert sorted(losses) == [0, 1] and all(np.isfinite(v) for v in losses.values())
    assert steps == list(range(6))  # 24 images / batch 8: 3 steps per epoch
    results = __import__("json").loads((run / "results.json").read_text())
    assert "student (compress_2q)" in results  # k-NN and clusters on features of the DALI evaluation loaders
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 3, "n": 24, "world_size": 1, "batch_size": 8, "seed": 0}]


@needs_dali
def test_disco_trains_on_two_mocov2_views_through_dali(tmp_path, tree):
    _, losses, steps, out = _train(tmp_path, tree, "method=disco", "data.augment=mocov2", "method.disco_hidden_dim=32",
                                   "perf.channels_last=true", "optim.epochs=1", "eval.at_end=false")
    assert list(losses) == [0] and np.isfinite(losses[0]) and steps == [0, 1, 2]


@needs_dali
@pytest.mark.parametrize("train,augment,views", [(True, "crop_flip", 1), (True, "mocov2", 2), (False, "crop_flip", 1)])
def test_the_gpu_graphs_are_well_formed(train, augment, views):
    """The graphs with mixed (GPU) decoding, defined without a GPU: every operator placed on a device DALI accepts
    (GPU data never feeds a CPU-only argument). Building needs a GPU: benchmarks/gpu_check.py runs them there."""
    import nvidia.dali as dali

    from compress_lit.data import dali_pipelines as dp

    spec = DaliSpec(64, 72, (0.08, 1.0), True, augment, 0.0, (0.5,) * 3, (0.25,) * 3, views, True)
    graph = dp.train_graph if train else dp.eval_graph
    pipe = dali.pipeline_def(graph, enable_conditionals=train)(
        files=["a.jpg"] * 4, indices=list(range(4)), spec=spec, decode_device="mixed", batch_size=4, num_threads=1,
        device_id=None, seed=1)
    pipe._build_graph()  # the Python graph only (DALI's own step before the backend is built)
    devices = [op._op.device for op in pipe._ops]
    assert "mixed" in devices and "gpu" in devices
    assert [e.device for e in pipe._graph_outputs] == ["gpu"] * views + ["cpu"]  # images on the GPU, indices host
