"""Benchmark: training-step throughput with the online teacher vs the cached teacher (``teacher.cached=true``).

The digits demo's sizes: teacher ResNet-18 small-input width 0.5 (256-d; randomly initialised: the weights do not
change the cost), student ``resnet18_small`` (ResNet-18 small-input width 0.25) with its momentum copy,
CompReSS-2q, queue 1,024, 16 px, batch 128, SGD with the demo's schedule. Both variants run under a
``pytorch_lightning.Trainer`` on CPU (no logger, no checkpointing, no progress bar) on the *same* pre-built batches
of the digits training split (the real training augmentation and dataset indices, made once, so data loading
costs neither variant anything): the online variant runs the teacher on every batch
(``DistillationModule.teacher_targets``: forward under inference mode); the cached variant looks the batch's rows
up in a float16 feature cache built beforehand with ``teacher_cache.build_cache`` on the centre-crop (evaluation)
transform, exactly as ``python -m compress_lit.cache_features`` does. The one-off cost of building the cache is
reported too.

Each step is the interval between consecutive ``on_train_batch_end`` calls (everything between steps counts);
the first steps of every run are warm-up. Online and cached runs alternate over several rounds, each from the
same initial weights; reported: median step time, images/s, and the speed-up (cached / online images/s) from the
medians and as the median of the per-round ratios (robust to a machine whose load changes). One CPU thread by
default (``--threads``), as in ``bench_train_step.py``: multi-threaded timings of these small networks swing
widely on a shared machine.

Usage: ``PYTHONPATH=src python benchmarks/bench_cached_teacher.py [--steps N] [--rounds R] [--threads T]
[--quick]``; prints the table, writes ``benchmarks/results/cached_teacher.json``. Under 2 minutes by default.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("PYTORCH_LIGHTNING_DISABLE_TIPS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, save_result  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from compress_lit.runtime.config import DataConfig, OptimConfig, TeacherConfig  # noqa: E402
from compress_lit.data import build_datamodule  # noqa: E402
from compress_lit.methods import CompReSS  # noqa: E402
from compress_lit.models import build_backbone  # noqa: E402
from compress_lit.teachers import FrozenTeacher  # noqa: E402
from compress_lit.teachers.cache import build_cache, cache_meta, expected_meta, open_cache  # noqa: E402




def environment() -> dict:
    import pytorch_lightning as pl

    return {"python": platform.python_version(), "torch": torch.__version__, "pytorch_lightning": pl.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": cpu_model(),
            "loadavg_start": os.getloadavg()}


def digits_config(batch: int) -> tuple:
    """The digits preset (conf/data/digits.yaml) and the demo teacher's architecture, as structured configs."""
    preset = OmegaConf.load(ROOT / "conf" / "data" / "digits.yaml")
    dcfg = OmegaConf.merge(OmegaConf.structured(DataConfig), preset.data, {"batch_size": batch})
    tcfg = OmegaConf.structured(TeacherConfig(name="demo_random", arch="resnet18", format="random",
                                              small_input=True, width_multiplier=0.5))
    return dcfg, tcfg


def make_module(teacher, queue: int, seed: int = 0) -> CompReSS:
    torch.manual_seed(seed)
    student = build_backbone("resnet18", small_input=True, width_multiplier=0.25)
    optim = OptimConfig(lr=0.05, epochs=30, scheduler="cosine", milestones=[])  # the digits demo's optimiser
    return CompReSS(student, teacher, optim, queue_size=queue)


def run(module: CompReSS, batches: list, steps: int) -> list[float]:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, Dataset

    class Batches(Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    class Stamps(pl.Callback):
        def __init__(self):
            self.t = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not self.t:
                self.t.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.t.append(time.perf_counter())

    stamps = Stamps()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[stamps])
    trainer.fit(module, train_dataloaders=DataLoader(Batches(), batch_size=None, shuffle=False))
    return stamps.t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4, help="online / cached run pairs, alternating")
    ap.add_argument("--budget-s", type=float, default=60.0, help="stop starting new rounds after this long")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--queue", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="few steps (smoke test)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cached_teacher.json"))
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.rounds = 3, 1, 1
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    t_start = time.perf_counter()
    env = environment()

    dcfg, tcfg = digits_config(a.batch)
    dm = build_datamodule(dcfg)
    dm.setup("fit")
    torch.manual_seed(0)
    teacher = FrozenTeacher(build_backbone("resnet18", small_input=True, width_multiplier=0.5), name="demo_random")
    # the same training batches for both variants: real augmentation, real dataset indices
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(dm.num_train, generator=g)
    torch.manual_seed(1)
    batches = []
    for b in range(dm.num_train // a.batch):
        items = [dm.train_dataset[int(i)] for i in order[b * a.batch:(b + 1) * a.batch]]
        batches.append((torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items]),
                        torch.tensor([i for _, _, i in items])))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features"
        meta = cache_meta(tcfg, dcfg, teacher, dm.num_train, seed=0)
        t0 = time.perf_counter()
        build_cache(path, teacher, dm.train_dataset_eval, meta, batch_size=int(dcfg.eval_batch_size),
                    progress=False)
        build_s = time.perf_counter() - t0
        cache_bytes = (path / "features.npy").stat().st_size
        cached = open_cache(path, expected_meta(tcfg, dcfg, dm.num_train, seed=0))

        template = make_module(teacher, a.queue)
        intervals = {"online": [], "cached": []}
        paired, rounds = [], 0
        t0 = time.perf_counter()
        for _ in range(a.rounds):
            if rounds and time.perf_counter() - t0 > a.budget_s:
                break
            rounds += 1
            per = {}
            for name in ("online", "cached"):
                module = copy.deepcopy(template)
                if name == "cached":
                    module.teacher = cached
                stamps = run(module, batches, a.warmup + a.steps)
                iv = [y - x for x, y in zip(stamps[a.warmup:], stamps[a.warmup + 1:])]
                intervals[name] += iv
                per[name] = statistics.median(iv)
            paired.append(per["online"] / per["cached"])

    rows = {}
    for name, iv in intervals.items():
        med = statistics.median(iv)
        rows[name] = {"step_s_median": med, "step_s_mean": statistics.fmean(iv), "images_per_s": a.batch / med,
                      "intervals_s": iv}
    speedup = rows["cached"]["images_per_s"] / rows["online"]["images_per_s"]
    result = {
        "environment": env,
        "setting": {"data": "digits (1,437 train images, 16 px, training augmentation)", "batch": a.batch,
                    "queue": a.queue, "method": "compress_2q (momentum student)",
                    "teacher": "resnet18 small_input width 0.5 (256-d), random init",
                    "student": "resnet18_small (resnet18 small_input width 0.25, 128-d)",
                    "cache": f"float16 {tuple(meta['shape'])}, {cache_bytes} bytes", "threads": a.threads,
                    "steps_per_run": a.steps, "warmup_steps": a.warmup, "rounds": rounds, "quick": a.quick},
        "cache_build_s": build_s,
        "cache_build_images_per_s": dm.num_train / build_s,
        "online": rows["online"], "cached": rows["cached"],
        "speedup_median_steps": speedup,
        "speedup_median_of_rounds": statistics.median(paired), "speedup_per_round": paired,
        "loadavg_end": os.getloadavg(), "wall_s": time.perf_counter() - t_start,
    }
    print(f"\nTraining step, digits demo sizes (batch {a.batch}, {a.threads} CPU thread(s), {rounds} rounds x "
          f"{a.steps} steps)\n")
    print(f"| teacher | step (median) | images/s | vs online |\n|---|---|---|---|")
    for name in ("online", "cached"):
        r = rows[name]
        ratio = r["images_per_s"] / rows["online"]["images_per_s"]
        print(f"| {name} | {1e3 * r['step_s_median']:.1f} ms | {r['images_per_s']:.0f} | {ratio:.2f}x |")
    print(f"\nspeed-up (median of per-round ratios): {statistics.median(paired):.2f}x; cache build (one pass over "
          f"{dm.num_train} centre crops): {build_s:.2f} s, {cache_bytes / 1024:.0f} KiB; wall {result['wall_s']:.0f} s")
    save_result(result, a.out)
    return result


if __name__ == "__main__":
    main()
