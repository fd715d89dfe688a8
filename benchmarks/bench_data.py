"""Benchmark of the ImageFolder input pipeline: images/s of one loader worker, PIL vs torchvision.io decoding.

Generates ``--images`` JPEGs of 500 x 375 (ImageNet's most common size; smooth colour fields plus texture and
noise, quality 90, about the size of an ImageNet JPEG) in a temporary ImageFolder tree (``train/`` and ``val/``,
4 classes), then runs the project's own code paths for ``data=imagenet`` in one process on one torch thread, which
is what one DataLoader worker is (PyTorch sets ``torch.set_num_threads(1)`` in every worker):

* ``decode_pil`` / ``decode_torchvision``: ``ImageFolderDataset.load_image`` with ``data.decoder=pil``
  (``Image.open(path).convert("RGB")``) / ``data.decoder=torchvision`` (``torchvision.io.decode_image``, uint8
  ``3 x H x W``);
* ``train_pil`` / ``train_torchvision``: ``ImageFolderDataset.__getitem__`` with
  :func:`compress_lit.data.transforms.train_transform` (``RandomResizedCrop(224, scale=(0.08, 1))``, flip,
  to float, ``Normalize``; ``torchvision.transforms`` on PIL images / ``transforms.v2`` on uint8 tensors);
* ``train_pil_then_tensor_ops``: PIL's decode, ``PILToTensor``, then the tensor path's operations (shows where
  the gain comes from: PIL's ``H x W x C`` pixels are slow input for the uint8 resize);
* ``eval_pil`` / ``eval_torchvision``: the evaluation pipeline (``Resize(256)``, ``CenterCrop(224)``).

The pipelines alternate in ``--rounds`` rounds over every image; each reports the median per-round images per
CPU second of the process (``time.process_time``: a worker on its own core; on this shared machine the wall-clock
rate, also recorded, depends on the other jobs). The two decoders' pixels are compared on every image (both are
libjpeg-turbo). The result is the number of loader workers a GPU needs:
``workers = ceil(student images/s / images/s per worker)`` (printed for a few student throughputs).

Usage: ``PYTHONPATH=src python benchmarks/bench_data.py [--images 200] [--rounds 5] [--quick]``; prints a table,
writes ``benchmarks/results/data.json``.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_model, save_result  # noqa: E402

WIDTH, HEIGHT = 500, 375
STUDENT_RATES = {"AlexNet (~3,000 img/s)": 3000, "ResNet-18 (~1,500 img/s)": 1500, "8 GPUs x AlexNet": 24000}


def environment() -> dict:
    import PIL
    import torchvision
    from PIL import features

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "pillow": PIL.__version__, "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": cpu_model(),
            "loadavg_start": os.getloadavg()}


def make_jpeg(rng: np.random.Generator, path: Path, quality: int = 90) -> int:
    """One 500 x 375 JPEG: a smooth colour field, a mid-frequency texture and pixel noise; returns its bytes."""
    from PIL import Image

    def upsampled(h, w, resample):
        small = rng.uniform(0, 255, (h, w, 3)).astype(np.uint8)
        return np.asarray(Image.fromarray(small).resize((WIDTH, HEIGHT), resample), dtype=np.float32)

    img = 0.7 * upsampled(6, 8, Image.BICUBIC) + 0.3 * upsampled(47, 63, Image.BILINEAR)
    img += rng.normal(0.0, 16.0, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)
    return path.stat().st_size


def make_tree(root: Path, n: int, classes: int = 4, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    sizes = []
    for split, count in (("train", n), ("val", classes)):
        for i in range(count):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            size = make_jpeg(rng, folder / f"img{i:05d}.jpg")
            if split == "train":
                sizes.append(size)
    return sizes


def pipelines(root: Path) -> tuple[dict, int]:
    """name -> function(index) doing one image's work (the project's own code paths), and the image count."""
    import torchvision.transforms.v2 as v2
    from omegaconf import OmegaConf

    from compress_lit.config import DataConfig
    from compress_lit.data.datasets import load_imagefolder_splits
    from compress_lit.data.transforms import eval_transform, train_transform

    preset = OmegaConf.load(ROOT / "conf" / "data" / "imagenet.yaml")
    fns, n = {}, 0
    for decoder in ("pil", "torchvision"):
        cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), preset.data, {"root": str(root), "decoder": decoder})
        train, _ = load_imagefolder_splits(cfg)
        n = len(train)
        fns[f"decode_{decoder}"] = train.load_image
        fns[f"train_{decoder}"] = lambda i, ds=train.with_transform(train_transform(cfg)): ds[i][0]
        fns[f"eval_{decoder}"] = lambda i, ds=train.with_transform(eval_transform(cfg)): ds[i][0]
        if decoder == "pil":  # PIL's decode, then the uint8 tensor operations of the torchvision path
            on_tensors = train_transform(OmegaConf.merge(cfg, {"decoder": "torchvision"}))
            tensor_ops = v2.Compose([v2.PILToTensor(), on_tensors])
            fns["train_pil_then_tensor_ops"] = lambda i, ds=train, t=tensor_ops: t(ds.load_image(i))
    order = ["decode_pil", "decode_torchvision", "train_pil", "train_torchvision", "train_pil_then_tensor_ops",
             "eval_pil", "eval_torchvision"]
    return {k: fns[k] for k in order}, n


def compare_decoders(fns: dict, n: int) -> dict:
    worst, total, differing = 0, 0.0, 0
    for i in range(n):
        a = torch.from_numpy(np.array(fns["decode_pil"](i))).permute(2, 0, 1).int()
        b = fns["decode_torchvision"](i).int()
        assert a.shape == b.shape, (a.shape, b.shape)
        d = (a - b).abs()
        worst, total = max(worst, int(d.max())), total + float(d.float().mean())
        differing += int(bool(d.any()))
    return {"images": n, "max_abs_diff": worst, "mean_abs_diff": total / n, "images_differing": differing}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5, help="passes over the images, pipelines alternating")
    ap.add_argument("--budget-s", type=float, default=75.0, help="stop starting new rounds after this long")
    ap.add_argument("--quick", action="store_true", help="20 images, 2 rounds (smoke test)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 20, 2
    torch.set_num_threads(1)  # one DataLoader worker
    torch.manual_seed(0)
    t_start = time.perf_counter()
    env = environment()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        sizes = make_tree(Path(tmp), args.images)
        fns, n = pipelines(Path(tmp))
        agreement = compare_decoders(fns, n)
        for fn in fns.values():  # warm-up
            fn(0)
        rates: dict[str, list[float]] = {k: [] for k in fns}  # images per CPU second
        wall: dict[str, list[float]] = {k: [] for k in fns}  # images per wall-clock second
        for r in range(args.rounds):
            if r >= 2 and time.perf_counter() - t_start > args.budget_s:
                break
            for name, fn in fns.items():
                t, c = time.perf_counter(), time.process_time()
                for i in range(n):
                    fn(i)
                rates[name].append(n / (time.process_time() - c))
                wall[name].append(n / (time.perf_counter() - t))
    per_worker = {k: statistics.median(v) for k, v in rates.items()}
    per_worker_wall = {k: statistics.median(v) for k, v in wall.items()}
    print(f"\n{n} JPEGs {WIDTH}x{HEIGHT}, mean {statistics.mean(sizes) / 1e3:.0f} KB; one process, one thread; "
          f"median of {len(rates['train_pil'])} rounds")
    print(f"{'pipeline':<26} {'images/CPU-s':>12} {'ms/image':>9} {'images/wall-s':>14}")
    for k in fns:
        print(f"{k:<26} {per_worker[k]:12.0f} {1000.0 / per_worker[k]:9.2f} {per_worker_wall[k]:14.0f}")
    print(f"decoders agree: max |PIL - torchvision.io| = {agreement['max_abs_diff']} "
          f"({agreement['images_differing']} of {agreement['images']} images differ)")
    workers = {}
    for label, rate in STUDENT_RATES.items():
        workers[label] = {"student_images_per_s": rate,
                          **{k: math.ceil(rate / per_worker[k]) for k in ("train_pil", "train_torchvision")}}
        print(f"{label}: {workers[label]['train_pil']} workers (PIL), "
              f"{workers[label]['train_torchvision']} (torchvision.io)")
    result = {
        "environment": env,
        "images": {"count": n, "width": WIDTH, "height": HEIGHT, "jpeg_quality": 90,
                   "mean_kb": statistics.mean(sizes) / 1e3, "min_kb": min(sizes) / 1e3, "max_kb": max(sizes) / 1e3},
        "rounds": len(rates["train_pil"]),
        "measure": "images per CPU second of one process on one torch thread (= one loader worker on its own core); "
                   "the wall-clock rate also depends on the other jobs of this shared machine",
        "images_per_s_per_worker": per_worker,
        "images_per_wall_s": per_worker_wall,
        "images_per_s_all_rounds": rates,
        "ms_per_image": {k: 1000.0 / v for k, v in per_worker.items()},
        "decode_share_of_train": {d: per_worker[f"train_{d}"] / per_worker[f"decode_{d}"]
                                  for d in ("pil", "torchvision")},
        "speedup_train_torchvision_over_pil": per_worker["train_torchvision"] / per_worker["train_pil"],
        "speedup_eval_torchvision_over_pil": per_worker["eval_torchvision"] / per_worker["eval_pil"],
        "decoder_agreement": agreement,
        "workers_needed": workers,
        "rule": "workers = ceil(student images/s / images/s per worker)",
        "wall_s": time.perf_counter() - t_start,
    }
    save_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
