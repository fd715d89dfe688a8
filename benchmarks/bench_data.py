"""Benchmark of the ImageFolder input pipeline: images/s of one loader worker, PIL vs torchvision.io vs DALI (CPU).

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
* ``eval_pil`` / ``eval_torchvision``: the evaluation pipeline (``Resize(256)``, ``CenterCrop(224)``);
* ``train_pil_2views`` / ``train_torchvision_2views``: two augmented views of each decoded image (``MultiView``:
  DisCo, MoCo from scratch);
* ``train_dali`` / ``train_dali_2views`` / ``eval_dali``: ``data.loader=dali`` in DALI's CPU mode, one DALI thread
  (``data/dali_pipelines.py``: the same crop, flip and normalisation; one view decodes the crop's region only, two
  views decode once and crop twice), whole batches of ``--dali-batch`` through a pipeline built per pass (as the
  loader builds one per epoch; the build is counted). Skipped, saying why, when DALI cannot be imported.

The pipelines alternate in ``--rounds`` rounds over every image; each reports the median per-round images per
CPU second of the process (``time.process_time``, every thread of the process counted: a worker on its own core;
on this shared machine the wall-clock rate, also recorded, depends on the other jobs). The two decoders' pixels
are compared on every image (both are libjpeg-turbo), and DALI's evaluation pixels with PIL's. The results are the
number of loader workers a GPU needs, ``workers = ceil(student images/s / images/s per worker)`` (printed for a
few student throughputs), and the CPU cores an 8-GPU node needs for its input pipeline at ``--gpu-rate`` images/s
per GPU (2,900: the goal, 23,200 images/s per node), ``cores = ceil(8 x rate / images per CPU second)``, per
loader, for 1 and 2 views. DALI decoding on the GPU (``device="mixed"``) leaves the CPU little to do: its rate is
measured by ``benchmarks/gpu_check.py`` on a GPU, not here.

Usage: ``PYTHONPATH=src python benchmarks/bench_data.py [--images 200] [--rounds 5] [--gpu-rate 2900] [--quick]``;
prints a table, writes ``benchmarks/results/data.json``.
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
GPU_RATE = 2900  # training images/s per GPU aimed at (mocov2_r50_to_resnet18 at batch 256, bf16): 23,200 per node
GPUS_PER_NODE = 8
LOADERS = {"PIL (data.decoder=pil)": "train_pil", "torchvision.io (data.decoder=torchvision)": "train_torchvision",
           "DALI, CPU mode (data.loader=dali)": "train_dali"}


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


def data_config(root: Path, **overrides):
    from omegaconf import OmegaConf

    from compress_lit.runtime.config import DataConfig

    preset = OmegaConf.load(ROOT / "conf" / "data" / "imagenet.yaml")
    return OmegaConf.merge(OmegaConf.structured(DataConfig), preset.data, {"root": str(root), **overrides})


def pipelines(root: Path) -> tuple[dict, int]:
    """name -> function(index) doing one image's work (the project's own code paths), and the image count."""
    import torchvision.transforms.v2 as v2
    from omegaconf import OmegaConf

    from compress_lit.data.datasets import load_imagefolder_splits
    from compress_lit.data.transforms import MultiView, eval_transform, train_transform

    fns, n = {}, 0
    for decoder in ("pil", "torchvision"):
        cfg = data_config(root, decoder=decoder)
        train, _ = load_imagefolder_splits(cfg)
        n = len(train)
        fns[f"decode_{decoder}"] = train.load_image
        fns[f"train_{decoder}"] = lambda i, ds=train.with_transform(train_transform(cfg)): ds[i][0]
        fns[f"train_{decoder}_2views"] = \
            lambda i, ds=train.with_transform(MultiView(train_transform(cfg), 2)): ds[i][0]
        fns[f"eval_{decoder}"] = lambda i, ds=train.with_transform(eval_transform(cfg)): ds[i][0]
        if decoder == "pil":  # PIL's decode, then the uint8 tensor operations of the torchvision path
            on_tensors = train_transform(OmegaConf.merge(cfg, {"decoder": "torchvision"}))
            tensor_ops = v2.Compose([v2.PILToTensor(), on_tensors])
            fns["train_pil_then_tensor_ops"] = lambda i, ds=train, t=tensor_ops: t(ds.load_image(i))
    order = ["decode_pil", "decode_torchvision", "train_pil", "train_torchvision", "train_pil_then_tensor_ops",
             "eval_pil", "eval_torchvision", "train_pil_2views", "train_torchvision_2views"]
    return {k: fns[k] for k in order}, n


def dali_passes(root: Path, batch: int) -> tuple[dict, str | None]:
    """name -> function() running every training image through ``data.loader=dali``'s CPU pipeline once (one DALI
    thread, a pipeline built per pass, no prefetching past the last batch), or ``{}`` and why DALI is missing."""
    from compress_lit.data.dali_loader import DaliLoader, dali_problem

    problem = dali_problem()
    if problem:
        return {}, problem
    from compress_lit.data.dali_pipelines import DaliSpec, build_pipeline
    from compress_lit.data.datasets import load_imagefolder_splits

    cfg = data_config(root, loader="dali")
    train, _ = load_imagefolder_splits(cfg)
    paths = [p for p, _ in train.samples]

    def run(views: int, is_train: bool):
        spec = DaliSpec.from_config(cfg, views=views)
        b = min(batch, len(paths))
        n = len(paths) // b * b if is_train else len(paths)  # training: whole batches, as the loader
        pipe = build_pipeline(paths[:n], list(range(n)), spec, train=is_train, batch_size=b, num_threads=1,
                              device_id=None, seed=0, prefetch=1)
        for _ in range(-(-n // b)):
            pipe.run()
        return n

    def dali_eval_pixels():  # DALI's evaluation batches (for the pixel comparison with PIL)
        loader = DaliLoader(train.with_transform(None), DaliSpec.from_config(cfg), train=False, batch_size=batch)
        return torch.cat([x for x, _, _ in loader])

    return {"train_dali": lambda: run(1, True), "train_dali_2views": lambda: run(2, True),
            "eval_dali": lambda: run(1, False), "_eval_pixels": dali_eval_pixels}, None


def compare_dali_eval(root: Path, dali_pixels) -> dict:
    """DALI's evaluation pipeline vs the PIL one, in grey levels, on every image."""
    from compress_lit.data.datasets import load_imagefolder_splits
    from compress_lit.data.transforms import eval_transform

    cfg = data_config(root)
    train, _ = load_imagefolder_splits(cfg)
    ds = train.with_transform(eval_transform(cfg))
    ref = torch.stack([ds[i][0] for i in range(len(ds))])
    std = torch.tensor(list(cfg.std)).view(1, -1, 1, 1) * 255.0
    d = ((dali_pixels() - ref) * std).abs()
    return {"images": len(ds), "max_abs_diff_levels": float(d.max()), "mean_abs_diff_levels": float(d.mean())}


def cores_per_node(rates: dict, gpu_rate: float, gpus: int = GPUS_PER_NODE) -> dict:
    """CPU cores a node of ``gpus`` GPUs needs for its input pipeline at ``gpu_rate`` training images/s per GPU."""
    out = {}
    for label, key in LOADERS.items():
        row = {}
        for views, name in ((1, key), (2, f"{key}_2views")):
            if name in rates:
                row[f"{views}_view{'s' if views > 1 else ''}"] = {
                    "images_per_cpu_s": rates[name], "cores": math.ceil(gpus * gpu_rate / rates[name])}
        if row:
            out[label] = row
    return out


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
    ap.add_argument("--gpu-rate", type=float, default=GPU_RATE,
                    help="training images/s per GPU the node's input pipeline must feed (cores per 8-GPU node)")
    ap.add_argument("--dali-batch", type=int, default=50, help="DALI's batch (images per pipeline run)")
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
        passes = {k: (lambda fn=fn: [fn(i) for i in range(n)] and n) for k, fn in fns.items()}
        dali, dali_missing = dali_passes(Path(tmp), args.dali_batch)
        dali_agreement = compare_dali_eval(Path(tmp), dali.pop("_eval_pixels")) if dali else None
        passes.update(dali)
        for name, fn in fns.items():  # warm-up
            fn(0)
        for fn in dali.values():
            fn()
        rates: dict[str, list[float]] = {k: [] for k in passes}  # images per CPU second
        wall: dict[str, list[float]] = {k: [] for k in passes}  # images per wall-clock second
        for r in range(args.rounds):
            if r >= 2 and time.perf_counter() - t_start > args.budget_s:
                break
            for name, run in passes.items():
                t, c = time.perf_counter(), time.process_time()
                done = run()
                rates[name].append(done / (time.process_time() - c))
                wall[name].append(done / (time.perf_counter() - t))
    per_worker = {k: statistics.median(v) for k, v in rates.items()}
    per_worker_wall = {k: statistics.median(v) for k, v in wall.items()}
    print(f"\n{n} JPEGs {WIDTH}x{HEIGHT}, mean {statistics.mean(sizes) / 1e3:.0f} KB; one process, one thread; "
          f"median of {len(rates['train_pil'])} rounds (2views: images, each giving two augmented views)")
    print(f"{'pipeline':<26} {'images/CPU-s':>12} {'ms/image':>9} {'images/wall-s':>14}")
    for k in passes:
        print(f"{k:<26} {per_worker[k]:12.0f} {1000.0 / per_worker[k]:9.2f} {per_worker_wall[k]:14.0f}")
    print(f"decoders agree: max |PIL - torchvision.io| = {agreement['max_abs_diff']} "
          f"({agreement['images_differing']} of {agreement['images']} images differ)")
    if dali_agreement:
        print(f"DALI evaluation pixels vs PIL's: max {dali_agreement['max_abs_diff_levels']:.2f}, mean "
              f"{dali_agreement['mean_abs_diff_levels']:.3f} grey levels")
    else:
        print(f"DALI skipped: {dali_missing}")
    workers = {}
    for label, rate in STUDENT_RATES.items():
        workers[label] = {"student_images_per_s": rate,
                          **{k: math.ceil(rate / per_worker[k]) for k in ("train_pil", "train_torchvision")}}
        print(f"{label}: {workers[label]['train_pil']} workers (PIL), "
              f"{workers[label]['train_torchvision']} (torchvision.io)")
    node = cores_per_node(per_worker, args.gpu_rate)
    per_node = GPUS_PER_NODE * args.gpu_rate
    print(f"\nCPU cores an {GPUS_PER_NODE}-GPU node needs for its input pipeline at {args.gpu_rate:,.0f} images/s per "
          f"GPU ({per_node:,.0f} images/s): ceil({per_node:,.0f} / images per CPU second)")
    for label, row in node.items():
        print(f"  {label:<42} " + ", ".join(
            f"{v.replace('_', ' ')}: {r['cores']} cores ({r['images_per_cpu_s']:.0f} img/CPU-s)"
            for v, r in row.items()))
    print(f"  {'DALI, GPU decoding (device=mixed)':<42} measured on a GPU by benchmarks/gpu_check.py")
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
        "dali_eval_vs_pil": dali_agreement,
        "dali_missing": dali_missing,
        "workers_needed": workers,
        "rule": "workers = ceil(student images/s / images/s per worker)",
        "gpu_rate_per_gpu": args.gpu_rate,
        "cores_per_node": node,
        "cores_rule": f"cores = ceil({GPUS_PER_NODE} x images/s per GPU / images per CPU second)",
        "wall_s": time.perf_counter() - t_start,
    }
    save_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
