"""``data.decoder=torchvision``: image folders decoded by torchvision.io, transformed as uint8 tensors.

The decoded pixels must equal PIL's (both are libjpeg-turbo), and the training / evaluation pipelines must give
PIL's results within one grey level (the antialiased resizes round differently), with the same random crops and
flips for the same seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from compress_lit.runtime.config import ConfigError, DataConfig, register_configs, validate_train
from compress_lit.data import build_datamodule
from compress_lit.data.datasets import DatasetError, ImageFolderDataset, load_imagefolder_splits, pil_luma
from compress_lit.data.transforms import eval_transform, train_transform

CONF = str(Path(__file__).resolve().parents[1] / "conf")
register_configs()


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth colour field with noise (JPEG-like content; its decode exercises the IDCT and upsampling)."""
    from PIL import Image

    low = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    return np.clip(np.asarray(low, dtype=np.float32) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def make_tree(root: Path, n: int = 3) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, fmt in (("jpeg", "JPEG"), ("other", None)):
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(n):
                img = Image.fromarray(_photo(rng, 45 + 6 * k, 60 + 4 * k))
                if fmt:
                    img.save(d / f"img{k}.jpg", "JPEG", quality=90)
                else:  # a PNG (torchvision.io reads it) and BMPs (it does not: PIL decodes them)
                    img.save(d / (f"img{k}.png" if k == 0 else f"img{k}.bmp"))


def data_cfg(root: Path, decoder: str, **kw):
    kw = {"name": "imagefolder", "root": str(root), "image_size": 32, "resize_size": 36, "num_workers": 0,
          "batch_size": 2, "decoder": decoder, **kw}
    return OmegaConf.structured(DataConfig(**kw))


@pytest.mark.parametrize("channels", [3, 1])
def test_decoded_pixels_equal_pil(tmp_path, channels):
    from torchvision.transforms.v2.functional import pil_to_tensor

    make_tree(tmp_path)
    mean, std = [0.5] * channels, [0.25] * channels
    pil, _ = load_imagefolder_splits(data_cfg(tmp_path, "pil", in_channels=channels, mean=mean, std=std))
    tv, _ = load_imagefolder_splits(data_cfg(tmp_path, "torchvision", in_channels=channels, mean=mean, std=std))
    assert tv.decoder == "torchvision" and len(tv) == len(pil) == 6
    for i in range(len(pil)):
        a, b = pil.load_image(i), tv.load_image(i)
        assert isinstance(b, torch.Tensor) and b.dtype == torch.uint8 and b.shape == (channels, a.height, a.width)
        assert torch.equal(pil_to_tensor(a), b), pil.samples[i][0]  # bit-identical: JPEG, PNG and (via PIL) BMP


def test_pil_luma_by_hand():
    rgb = torch.tensor([[[255, 0, 0, 10]], [[0, 255, 0, 20]], [[0, 0, 255, 30]]], dtype=torch.uint8)
    # 255 * 19595 / 65536 = 76.24 -> 76; 255 * 38470 / 65536 = 149.7 -> 150; 255 * 7471 / 65536 = 29.07 -> 29;
    # (10 * 19595 + 20 * 38470 + 30 * 7471 + 32768) >> 16 = 1220243 >> 16 = 18
    assert pil_luma(rgb).tolist() == [[[76, 150, 29, 18]]]


def test_transforms_match_pil_within_one_grey_level(tmp_path):
    make_tree(tmp_path)
    for augment in ("crop_flip", "mocov2"):
        cfgs = {d: data_cfg(tmp_path, d, augment=augment) for d in ("pil", "torchvision")}
        ds = {d: load_imagefolder_splits(c)[0] for d, c in cfgs.items()}
        one_level = 1 / 255 / min(cfgs["pil"].std) + 1e-5  # one grey level after Normalize
        for i in range(len(ds["pil"])):
            outs = {}
            for d in ds:
                ev = eval_transform(cfgs[d])(ds[d].load_image(i))
                torch.manual_seed(i)
                tr = train_transform(cfgs[d])(ds[d].load_image(i))
                outs[d] = (ev, tr)
            for (a, b), what in zip(zip(outs["pil"], outs["torchvision"]), ("eval", "train")):
                assert a.shape == b.shape == (3, 32, 32) and b.dtype == torch.float32
                if what == "train" and augment == "mocov2":
                    continue  # colour jitter draws its order and factors differently in transforms.v2
                diff = (a - b).abs()
                assert diff.max() <= one_level, (what, augment, i, float(diff.max()))  # same crop, same flip
                assert diff.mean() < 0.3 * one_level


def test_datamodule_batches_and_bad_files(tmp_path):
    make_tree(tmp_path)
    dm = build_datamodule(data_cfg(tmp_path, "torchvision"))
    dm.setup("fit")
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and x.abs().max() < 3
    # a truncated JPEG: torchvision.io refuses it, PIL too; the error names the file
    bad = tmp_path / "train" / "jpeg" / "img0.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    train, _ = load_imagefolder_splits(data_cfg(tmp_path, "torchvision"))
    with pytest.raises(DatasetError, match=str(bad)):
        train[[p for p, _ in train.samples].index(str(bad))]
    with pytest.raises(DatasetError, match=r"data\.decoder='jpeg' is invalid"):
        ImageFolderDataset([], [], decoder="jpeg")


def test_bad_decoder_is_a_config_error():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data.decoder=turbo"])
    one_line = r"^data\.decoder='turbo' is invalid: choose one of \['pil', 'torchvision'\]$"
    with pytest.raises(ConfigError, match=one_line):
        validate_train(cfg)
