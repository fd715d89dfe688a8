"""What an exported network is measured by: its parity with PyTorch on real or random images, its parameters,
FLOPs and median latency."""
from __future__ import annotations

import logging
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

log = logging.getLogger("compress_lit.export")


# ------------------------------------------------------------------------------------------------------------
# checks and measurements
# ------------------------------------------------------------------------------------------------------------
def parity_inputs(shape: tuple[int, int, int], pcfg: Any, data_cfg: Any, seed: int = 0
                  ) -> tuple[list[tuple[str, torch.Tensor]], str]:
    """Named input batches for the parity check and a description of the real-shaped ones."""
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in dict.fromkeys((1, int(pcfg.random_batch))):
        for i in range(int(pcfg.random_inputs)):
            out.append((f"random N(0,1), batch {b} #{i}", torch.randn(b, c, h, w, generator=g)))
    n = int(pcfg.real_inputs)
    if n <= 0:
        return out, "none"
    images, what = None, ""
    if data_cfg is not None and int(data_cfg.image_size) == h:
        try:
            from ..data import build_datamodule

            ds = build_datamodule(data_cfg).val_dataset
            idx = torch.linspace(0, len(ds) - 1, min(n, len(ds))).long().tolist()
            images = torch.stack([ds[i][0] for i in idx]).float()
            what = f"{len(idx)} val images of {data_cfg.name}"
        except Exception as e:  # the data is not on this machine: synthetic pixels instead
            log.info("parity: the %s val split is not available here (%s); using synthetic images", data_cfg.name, e)
    if images is None or tuple(images.shape[1:]) != (c, h, w):
        mean = torch.tensor(list(data_cfg.mean) if data_cfg is not None else [0.5] * c)[:c].view(1, -1, 1, 1)
        std = torch.tensor(list(data_cfg.std) if data_cfg is not None else [0.25] * c)[:c].view(1, -1, 1, 1)
        images = (torch.rand(n, c, h, w, generator=g) - mean) / std
        what = f"{n} synthetic images (uniform [0, 1] pixels, normalised with the data's mean/std)"
    out.append((what, images))
    return out, what


def check_parity(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor],
                 inputs: list[tuple[str, torch.Tensor]], tolerance: float) -> dict[str, Any]:
    checks, scale, worst = [], 0.0, 0.0
    shapes_ok = True
    for name, x in inputs:
        with torch.inference_mode():
            ref = model(x).float()
        got = run(x).float()
        if tuple(got.shape) != tuple(ref.shape):
            shapes_ok = False
            checks.append({"input": name, "shape": list(x.shape), "error": f"output shape {tuple(got.shape)} "
                                                                             f"vs torch {tuple(ref.shape)}"})
            continue
        d = float((got - ref).abs().max())
        scale, worst = max(scale, float(ref.abs().max())), max(worst, d)
        checks.append({"input": name, "shape": list(x.shape), "max_abs_diff": d})
    allowed = tolerance * max(scale, 1e-12)
    return {"tolerance": tolerance, "output_scale": scale, "allowed": allowed, "max_abs_diff": worst,
            "relative": worst / max(scale, 1e-12), "passed": bool(shapes_ok and worst <= allowed), "checks": checks,
            "rule": "max |exported - torch| <= tolerance * max |torch| over all inputs"}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward of ``example`` (batch 1: per image), as FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(example)
    return int(fc.get_total_flops()) // int(example.shape[0])


def median_latency_ms(fn: Callable[[], Any], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def torch_latency_ms(model: nn.Module, example: torch.Tensor, runs: int, warmup: int) -> float:
    def step():
        with torch.inference_mode():
            model(example)

    return median_latency_ms(step, runs, warmup)


@contextmanager
def _threads(n: Optional[int]) -> Iterator[int]:
    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(prev)
