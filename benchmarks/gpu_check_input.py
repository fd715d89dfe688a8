"""The input-pipeline parts of ``benchmarks/gpu_check.py``: is the GPU fed?

(d) **DALI's pipeline alone**: images/s of ``data.loader=dali``'s training pipeline (``DaliLoader``, 1 and 2
    views, batch 256, 224 px) decoding on the GPU (``device="mixed"``: nvJPEG and the hardware JPEG decoder), with
    the CPU seconds per image of the process (DALI's threads included) and the CPU cores an 8-GPU node would
    spend at 2,900 images/s per GPU.
(e) **End-to-end training**: images/s of ``experiment=paper/mocov2_r50_to_resnet18`` (MoCo v2 R50 teacher with
    random weights, ResNet-18 student, CompReSS-2q, queue 128,000) at global batch 256 under bf16 autocast with
    channels_last, on one GPU, through the library's own datamodule and Lightning ``Trainer``, for every
    combination of ``data.loader`` (torch workers, DALI) and teacher (online; ``teacher.cached=true``, its cache
    built first), timed over steps after a warm-up, with the GPU utilisation (NVML through ``torch.cuda``, else
    ``nvidia-smi``, sampled every 0.2 s) and the busy CPU cores of the machine (``/proc/stat``) over the same window.

Both read a generated ImageFolder tree of 500 x 375 JPEGs (``bench_data.make_jpeg``: about an ImageNet JPEG; a set
of distinct images repeated through symbolic links up to the count one epoch needs, so no epoch boundary falls
in a timed window). ``SMOKE_INPUT`` runs the same code on the CPU at tiny sizes (32 px, narrow networks, a few
steps), which ``tests/test_gpu_check_smoke.py`` runs.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_RATE, GPUS_PER_NODE = 2900, 8  # the goal: 2,900 training images/s per GPU, 23,200 per 8-GPU node

FULL_INPUT = dict(unique=1024, batch=256, px=224, resize=256, dali_batches=12, dali_warmup=3, warmup=10, steps=20,
                  workers=None, queue=None, widths=None, experiment="paper/mocov2_r50_to_resnet18")
SMOKE_INPUT = dict(unique=24, batch=8, px=32, resize=36, dali_batches=2, dali_warmup=1, warmup=1, steps=2,
                   workers=1, queue=64, widths=0.125, experiment="paper/mocov2_r50_to_resnet18")


# ------------------------------------------------------------------------------------------------ the images
def make_tree(root: Path, unique: int, total: int, classes: int = 8, seed: int = 0) -> Path:
    """``root/{train,val}/c<k>/`` with ``total`` training files: ``unique`` generated JPEGs, the rest symbolic
    links to them; ``classes`` validation images."""
    from multiprocessing import Pool

    from bench_data import make_jpeg  # noqa: F401 (imported here: the workers import it again)

    src = root / "unique"
    src.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, str(src / f"u{i:05d}.jpg")) for i in range(unique)]
    with Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.map(_one_jpeg, jobs)
    for split, count in (("train", total), ("val", classes)):
        for i in range(count):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"img{i:06d}.jpg").symlink_to(src / f"u{i % unique:05d}.jpg")
    return root


def _one_jpeg(job) -> None:
    from bench_data import make_jpeg

    seed, i, path = job
    make_jpeg(np.random.default_rng([seed, i]), Path(path))


# ------------------------------------------------------------------------------------------- utilisation
class Utilisation:
    """GPU utilisation (%) sampled every ``every`` seconds in a thread, and the machine's busy CPU cores."""

    def __init__(self, device: torch.device, every: float = 0.2):
        self.device, self.every = device, every
        self.samples: list[float] = []
        self.source = None
        self._stop = threading.Event()
        self._thread = None

    def _sample(self):
        if self.device.type != "cuda":
            return None
        if self.source in (None, "nvml"):
            try:
                v = float(torch.cuda.utilization(self.device))
                self.source = "nvml"
                return v
            except Exception:  # noqa: BLE001 - no pynvml: nvidia-smi
                self.source = "nvidia-smi"
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", str(self.device.index or 0)], capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip().splitlines()[0])
        except Exception:  # noqa: BLE001
            self.source = "unavailable"
            return None

    def _run(self):
        while not self._stop.is_set():
            v = self._sample()
            if v is not None:
                self.samples.append(v)
            self._stop.wait(self.every)

    @staticmethod
    def _cpu_jiffies() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields) - idle, sum(fields)

    def __enter__(self):
        self._t0, self._busy0 = time.perf_counter(), self._cpu_jiffies()[0]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        seconds = time.perf_counter() - self._t0
        busy = (self._cpu_jiffies()[0] - self._busy0) / os.sysconf("SC_CLK_TCK")
        self.result = {"gpu_util_mean_pct": float(np.mean(self.samples)) if self.samples else None,
                       "gpu_util_samples": len(self.samples), "gpu_util_source": self.source,
                       "busy_cpu_cores": busy / seconds if seconds > 0 else None}
        return False


def _device_id(device: torch.device):
    """The CUDA device index DALI decodes on, ``None`` for the CPU."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------- (d) DALI pipeline alone
def dali_pipeline_rate(tree: Path, size: dict, device: torch.device) -> dict:
    """Images/s and CPU seconds per image of ``DaliLoader``'s training pipeline (1 and 2 views)."""
    from omegaconf import OmegaConf

    from compress_lit.runtime.config import DataConfig
    from compress_lit.data.dali_loader import DaliLoader, dali_problem
    from compress_lit.data.dali_pipelines import DaliSpec
    from compress_lit.data.datasets import load_imagefolder_splits
    from compress_lit.data.workers import available_cpus

    problem = dali_problem()
    if problem:
        return {"skipped": problem}
    preset = OmegaConf.load(ROOT / "conf" / "data" / "imagenet.yaml")
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), preset.data,
                          {"root": str(tree), "image_size": size["px"], "resize_size": size["resize"],
                           "loader": "dali"})
    train, _ = load_imagefolder_splits(cfg)
    threads = min(8, available_cpus())
    out = {"device": "mixed (GPU)" if device.type == "cuda" else "cpu", "threads": threads, "batch": size["batch"]}
    for views in (1, 2):
        loader = DaliLoader(train, DaliSpec.from_config(cfg, views=views, channels_last=True), train=True,
                            batch_size=size["batch"], num_threads=threads, device_id=_device_id(device), seed=0)
        it = iter(loader)
        for _ in range(size["dali_warmup"]):
            next(it)
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        with Utilisation(device) as util:
            for _ in range(size["dali_batches"]):
                next(it)
            sync(device)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        n = size["dali_batches"] * size["batch"]
        per_cpu_s = n / cpu if cpu > 0 else float("inf")
        out[f"{views}_view{'s' if views > 1 else ''}"] = {
            "images_per_s": n / wall, "cpu_s_per_image": cpu / n, "images_per_cpu_s": per_cpu_s,
            "cores_per_8gpu_node_at_2900": math.ceil(GPUS_PER_NODE * GPU_RATE / per_cpu_s), **util.result}
        del it, loader
    return out


# ---------------------------------------------------------------------------------- (e) end-to-end training
class _Window:
    """A Lightning callback timing ``steps`` training steps after ``warmup`` ones (synchronised at both ends)."""

    def __new__(cls, warmup: int, steps: int, device: torch.device):
        import pytorch_lightning as pl

        class Window(pl.Callback):
            def __init__(self):
                self.util = Utilisation(device)
                self.t0 = self.t1 = None

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == warmup:
                    sync(device)
                    self.t0 = time.perf_counter()
                    self.util.__enter__()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == warmup + steps:
                    sync(device)
                    self.t1 = time.perf_counter()
                    self.util.__exit__(None, None, None)
                    trainer.should_stop = True

        return Window()


def train_rate(tree: Path, size: dict, device: torch.device, loader: str, cached: bool, work: Path) -> dict:
    """Images/s of the experiment's training steps with ``data.loader=loader``, online or cached teacher."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import pytorch_lightning as pl

    from compress_lit.runtime.config import register_configs, validate_train
    from compress_lit.data import build_datamodule
    from compress_lit.runtime.distributed import apply_batch_plan
    from compress_lit.teachers import build_teacher
    from compress_lit.methods.build import METHOD_VIEWS, build_method, build_student
    from compress_lit.training.teacher import cached_teacher

    register_configs()
    gpu = device.type == "cuda"
    overrides = [f"experiment={size['experiment']}", f"data.root={tree}", f"data.loader={loader}",
                 "teacher.format=random", "teacher.checkpoint=null", f"data.batch_size={size['batch']}",
                 f"data.eval_batch_size={size['batch']}", f"data.image_size={size['px']}",
                 f"data.resize_size={size['resize']}", f"cache_dir={work / 'cache'}", "perf.channels_last=true",
                 "eval.at_end=false", "logger.name=none", f"teacher.cached={str(cached).lower()}",
                 "teacher.build_cache_if_missing=true", f"trainer={'gpu' if gpu else 'cpu'}",
                 "trainer.precision=bf16-mixed"]
    if size["workers"] is not None:
        overrides.append(f"data.num_workers={size['workers']}")
    else:
        overrides.append(f"data.num_workers={min(16, os.cpu_count() or 1)}")
    if size["queue"] is not None:
        overrides.append(f"method.queue_size={size['queue']}")
    if size["widths"] is not None:
        overrides += [f"teacher.width_multiplier={size['widths']}", f"student.width_multiplier={size['widths']}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    validate_train(cfg)
    pl.seed_everything(0, workers=True)
    dm = build_datamodule(cfg.data, views=METHOD_VIEWS.get(cfg.method.name, 1), channels_last=True)
    dm.setup("fit")
    t_cache = time.perf_counter()
    teacher = cached_teacher(cfg, dm) if cached else build_teacher(cfg.teacher)
    t_cache = time.perf_counter() - t_cache
    module = build_method(cfg, build_student(cfg.student), teacher, dm).use_channels_last()
    window = _Window(size["warmup"], size["steps"], device)
    trainer = pl.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed",
                         max_steps=size["warmup"] + size["steps"], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[window])
    apply_batch_plan(cfg, trainer, module)
    t = time.perf_counter()
    trainer.fit(module, dm)
    total = time.perf_counter() - t
    if window.t1 is None:
        raise RuntimeError(f"the timed window did not close: {trainer.global_step} steps ran")
    seconds = window.t1 - window.t0
    res = {"loader": loader, "teacher": "cached" if cached else "online", "batch": size["batch"],
           "steps": size["steps"], "images_per_s": size["steps"] * size["batch"] / seconds,
           "step_ms": 1e3 * seconds / size["steps"], "fit_s": total, **window.util.result,
           "num_workers": int(cfg.data.num_workers)}
    if cached:
        res["teacher_setup_s"] = t_cache
    del trainer, module, dm, teacher
    if gpu:
        torch.cuda.empty_cache()
    return res


def input_checks(size: dict, device: torch.device, work: Path, log=print) -> dict:
    """(d) and (e): DALI's pipeline alone, then the training throughput of every loader x teacher."""
    total = (size["warmup"] + size["steps"] + 2) * size["batch"]  # one epoch holds every step
    t = time.perf_counter()
    tree = make_tree(work / "tree", size["unique"], max(total, size["unique"]))
    out = {"images": {"train_files": max(total, size["unique"]), "distinct_jpegs": size["unique"],
                      "make_s": time.perf_counter() - t}}
    log("(d) DALI's training pipeline alone ...")
    try:
        out["dali_pipeline"] = dali_pipeline_rate(tree, size, device)
    except Exception as e:  # noqa: BLE001 - recorded, the other checks go on
        out["dali_pipeline"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    log(f"    {out['dali_pipeline']}")
    rows = []
    for cached in (False, True):
        for loader in ("torch", "dali"):
            log(f"(e) training throughput: data.loader={loader}, teacher {'cached' if cached else 'online'} ...")
            try:
                rows.append(train_rate(tree, size, device, loader, cached, work))
            except Exception as e:  # noqa: BLE001
                rows.append({"loader": loader, "teacher": "cached" if cached else "online",
                             "error": f"{type(e).__name__}: {e}"[:500]})
            log(f"    {rows[-1]}")
    out["training"] = rows
    shutil.rmtree(work / "tree", ignore_errors=True)
    return out


def markdown(inp: dict) -> list[str]:
    lines = ["", "#### Input pipeline", ""]
    d = inp.get("dali_pipeline", {})
    if "1_view" in d:
        lines += [f"DALI training pipeline alone ({d['device']}, {d['threads']} threads, batch {d['batch']}):", "",
                  "| views | images/s | CPU ms/image | cores per 8-GPU node at 2,900 img/s/GPU | GPU util % |",
                  "|---|---|---|---|---|"]
        for k in ("1_view", "2_views"):
            r = d[k]
            util = f"{r['gpu_util_mean_pct']:.0f}" if r.get("gpu_util_mean_pct") is not None else "n/a"
            lines.append(f"| {k.split('_')[0]} | {r['images_per_s']:.0f} | {1e3 * r['cpu_s_per_image']:.2f} | "
                         f"{r['cores_per_8gpu_node_at_2900']} | {util} |")
    else:
        lines.append(f"DALI training pipeline alone: {d}")
    lines += ["", "End-to-end training (the experiment, bf16, channels_last, one GPU):", "",
              "| data.loader | teacher | images/s | ms/step | GPU util % | busy CPU cores |",
              "|---|---|---|---|---|---|"]
    for r in inp.get("training", []):
        if "error" in r:
            lines.append(f"| {r['loader']} | {r['teacher']} | error: {r['error'][:120].replace('|', '/')} | | | |")
            continue
        util = f"{r['gpu_util_mean_pct']:.0f}" if r.get("gpu_util_mean_pct") is not None else "n/a"
        cores = f"{r['busy_cpu_cores']:.1f}" if r.get("busy_cpu_cores") is not None else "n/a"
        lines.append(f"| {r['loader']} | {r['teacher']} | {r['images_per_s']:.0f} | {r['step_ms']:.1f} | {util} | "
                     f"{cores} |")
    return lines
