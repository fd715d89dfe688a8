"""GPU check: bf16 loss correctness, then CompReSS-2q training throughput, official-style fp32 vs ours.

One prepared script, sized to finish in about 5 minutes on one H100 (most of it torch.compile's warm-up):

(a) **Correctness.** A CompReSS-2q module (MoCo-R50-shaped teacher, ResNet-18 student, momentum student; random
    weights, the teacher's BatchNorm statistics calibrated on synthetic images so that its embeddings spread as a
    trained teacher's do) with its queues filled by real keys of the networks. The loss of a training step on the
    same batches (``eval_batches`` of them) in fp32 (TF32 off) and under bf16 autocast: relative error asserted
    below ``BF16_REL_BOUND`` (2%, the bound ``tests/test_precision.py`` states); also the loss function alone on
    embeddings rounded to bf16 (same bound), and the relative error of the gradient w.r.t. the student embedding
    (reported only: with random weights it is several %).
(b) **Throughput.** Images/s of the full training step (teacher forward, student forward/backward, momentum
    forward, loss, SGD step, EMA, queue update) on GPU-resident synthetic batches (batch 256, 224 px, queue
    128,000) for
    (i)  the official scripts' formulation in fp32: queues cloned every step, ``index_copy_`` before the
         backward, NCHW tensors (PyTorch's default TF32 flags, recorded in the JSON);
    (ii) ours: ``compress_lit.methods.CompReSS`` (in-place ring write after the backward, no queue copy) under
         bf16 autocast with channels_last, the student ``torch.compile``d when that works (a failure is
         caught, recorded, and the step runs eagerly).
    The ratio (ii)/(i), the peak GPU memory of each, and the achieved TFLOP/s (FLOPs of one step counted with
    ``torch.utils.flop_counter.FlopCounterMode``; the same model FLOPs for both) are reported.

(c) **Host synchronisations** per training step of ``CompReSS`` (``torch.cuda.set_sync_debug_mode``; target 0).
(d), (e) **The input pipeline** (``gpu_check_input.py``): images/s of ``data.loader=dali``'s training pipeline
    decoding on the GPU (1 and 2 views), and the end-to-end training images/s of
    ``experiment=paper/mocov2_r50_to_resnet18`` at global batch 256 in bf16 with each loader (torch workers, DALI)
    and each teacher (online, cached), with the GPU utilisation and the busy CPU cores: 4 training runs of 30 steps
    and a short DALI run, added to the 5 minutes of (a)-(c) so that the whole check fits one 8-minute call (not yet
    timed on a GPU). ``--skip-input`` leaves them out, ``--only-input`` runs them alone (two calls if needed).

Writes the JSON to ``--out`` (default ``benchmarks/results/gpu_check.json``) and a markdown table next to it
(same name, ``.md``). ``--smoke`` runs every code path that can run on a CPU at tiny sizes (32 px, small queue,
2 steps, ``torch.compile`` with the dynamo-only ``eager`` backend, one CPU thread) in well under 30 s; its default
output is ``benchmarks/results/gpu_check_smoke.json``. Exit status 1 when the correctness bound fails (after writing).

Usage (GPU): ``PYTHONPATH=src python benchmarks/gpu_check.py``; (CPU) ``... gpu_check.py --smoke``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

from compress_lit.runtime.config import OptimConfig  # noqa: E402
from compress_lit.losses.compress import compress_loss  # noqa: E402
from compress_lit.methods import CompReSS  # noqa: E402
from compress_lit.models import build_backbone  # noqa: E402
from compress_lit.methods.momentum import ema_update  # noqa: E402
from compress_lit.teachers import FrozenTeacher  # noqa: E402

BF16_REL_BOUND = 0.02  # relative error of the bf16-autocast loss vs fp32 (as tests/test_precision.py)
TEMPERATURE = 0.04

FULL = dict(px=224, batch=256, queue=128_000, steps=20, warmup=5, small_input=False, teacher_width=None,
            student_width=None, fill_batches=16, eval_batches=2, compile_backend="inductor")
SMOKE = dict(px=32, batch=32, queue=512, steps=2, warmup=1, small_input=True, teacher_width=0.125,
             student_width=0.125, fill_batches=4, eval_batches=4, compile_backend="eager")


def log(msg: str) -> None:
    print(msg, flush=True)




def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": str(device), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "cpu": cpu_model(), "loadavg_start": os.getloadavg()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_line(e: BaseException, limit: int = 300) -> str:
    """The exception's type and message on one line, at most ``limit`` characters of message."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


# ------------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------------
def build_module(cfg: dict, device: torch.device, seed: int = 0) -> CompReSS:
    torch.manual_seed(seed)
    teacher = FrozenTeacher(build_backbone("resnet50", small_input=cfg["small_input"],
                                           width_multiplier=cfg["teacher_width"]))
    student = build_backbone("resnet18", small_input=cfg["small_input"], width_multiplier=cfg["student_width"])
    module = CompReSS(student, teacher, OptimConfig(), queue_size=cfg["queue"])
    return module.to(device).train()


def synthetic_batches(n: int, cfg: dict, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """``n`` batches of random images, made on ``device`` (GPU-resident on a GPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(cfg["batch"], 3, cfg["px"], cfg["px"], generator=g, device=device) for _ in range(n)]


def structured_batches(n: int, cfg: dict, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Synthetic images with some variety between them: smooth random patterns, per-image contrast and colour."""
    g = torch.Generator(device=device).manual_seed(seed)
    b, px, kw = cfg["batch"], cfg["px"], dict(generator=g, device=device)
    out = []
    for _ in range(n):
        low = F.interpolate(torch.randn(b, 3, 7, 7, **kw), size=(px, px), mode="bilinear", align_corners=False)
        out.append(low * (0.5 + 2 * torch.rand(b, 1, 1, 1, **kw)) + torch.randn(b, 3, 1, 1, **kw)
                   + 0.3 * torch.randn(b, 3, px, px, **kw))
    return out


@torch.no_grad()
def calibrate_batchnorm(backbone: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """Running BatchNorm statistics of a randomly initialised network set from ``batches`` (cumulative average).

    A random network in eval mode with the initial statistics (mean 0, var 1) maps every image to almost the same
    embedding (cosine ~0.999 between images for ResNet-50), which makes the teacher's softmax uniform and the
    loss nearly 0; with calibrated statistics the embeddings spread (cosine ~0.9 +- 0.07), as a trained teacher's
    do, and the correctness check compares losses of a realistic size.
    """
    was_training = backbone.training
    for m in backbone.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    backbone.train()
    for x in batches:
        backbone(x)
    backbone.train(was_training)


@torch.no_grad()
def fill_queues(module: CompReSS, batches: list[torch.Tensor]) -> None:
    """Fill the queues with real (normalised) keys: those of ``batches``, tiled with a little noise."""
    q = module.queues
    keys_t = torch.cat([F.normalize(module.teacher(x).float(), dim=1) for x in batches])
    keys_s = torch.cat([F.normalize(module.student_momentum(x).float(), dim=1) for x in batches])
    reps = -(-q.size // keys_t.shape[0])
    g = torch.Generator(device=keys_t.device).manual_seed(1)

    def tile(k):
        k = k.repeat(reps, 1)[: q.size]
        noise = torch.randn(k.shape, generator=g, device=k.device) * (0.05 / k.shape[1] ** 0.5)
        return F.normalize(k + noise, dim=1)

    q.bank("teacher").copy_(tile(keys_t))
    q.bank("student").copy_(tile(keys_s))
    q.num_enqueued.fill_(q.size)


# ------------------------------------------------------------------------------------------------------------
# (a) correctness
# ------------------------------------------------------------------------------------------------------------
def step_loss(module: CompReSS, x: torch.Tensor, bf16: bool):
    """Loss and d loss / d student embedding of one training step on ``x`` (no optimiser step, no enqueue)."""
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
        t = module.teacher_targets(x, None)
        s = module.student(x)
    s = s.float().detach().requires_grad_(True)
    loss = compress_loss(s, t, module.queues.bank("student"), module.queues.bank("teacher"), TEMPERATURE)
    loss.backward()
    return loss.detach(), s.grad


def check_correctness(cfg: dict, device: torch.device, seed: int = 0) -> dict:
    """bf16 autocast vs fp32: the loss (and its gradient) over ``cfg['eval_batches']`` batches of one module."""
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
    try:
        module = build_module(cfg, device, seed=seed)
        fill = structured_batches(cfg["fill_batches"], cfg, device, seed=1000 + seed)
        calibrate_batchnorm(module.teacher.backbone, fill[:4])
        module.teacher.eval()
        fill_queues(module, fill)
        module.train()  # as in training: the student's BatchNorm on batch statistics (the teacher stays in eval)
        q = module.queues
        l32, l16, lf32, lf16, g32, g16, cos_t = [], [], [], [], [], [], []
        for x in structured_batches(cfg["eval_batches"], cfg, device, seed=2000 + seed):
            loss, grad = step_loss(module, x, bf16=False)
            l32.append(loss)
            g32.append(grad)
            loss, grad = step_loss(module, x, bf16=True)
            l16.append(loss)
            g16.append(grad)
            # the loss function alone: the same fp32 embeddings, rounded to bf16
            with torch.no_grad():
                t = module.teacher(x).float()
                s = module.student(x).float()
            lf32.append(compress_loss(s, t, q.bank("student"), q.bank("teacher"), TEMPERATURE))
            lf16.append(compress_loss(s.bfloat16(), t.bfloat16(), q.bank("student"), q.bank("teacher"),
                                      TEMPERATURE))
            off = ~torch.eye(t.shape[0], dtype=torch.bool, device=t.device)
            cos_t.append((F.normalize(t, dim=1) @ F.normalize(t, dim=1).t())[off])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    mean = lambda v: float(torch.stack(v).mean())  # noqa: E731
    g32, g16, cos_t = torch.cat(g32), torch.cat(g16), torch.cat(cos_t)
    out = {"images": cfg["eval_batches"] * cfg["batch"], "loss_fp32": mean(l32), "loss_bf16_autocast": mean(l16),
           "grad_rel_err": float((g16 - g32).norm() / g32.norm()),
           "loss_fn_only_fp32": mean(lf32), "loss_fn_only_bf16_inputs": mean(lf16),
           "bound": BF16_REL_BOUND, "loss_dtype_under_autocast": str(l16[0].dtype),
           "teacher_cosine_between_images_mean": float(cos_t.mean()),
           "teacher_cosine_between_images_std": float(cos_t.std())}
    out["rel_err"] = abs(out["loss_bf16_autocast"] - out["loss_fp32"]) / abs(out["loss_fp32"])
    out["loss_fn_only_rel_err"] = abs(out["loss_fn_only_bf16_inputs"] - out["loss_fn_only_fp32"]) / abs(
        out["loss_fn_only_fp32"])
    out["passed"] = bool(out["rel_err"] < BF16_REL_BOUND and out["loss_fn_only_rel_err"] < BF16_REL_BOUND)
    del module
    return out


# ------------------------------------------------------------------------------------------------------------
# (b) throughput
# ------------------------------------------------------------------------------------------------------------
class OfficialStyle:
    """The official scripts' step: fp32, NCHW, queues cloned every step, index_copy_ before the backward."""

    def __init__(self, module: CompReSS):
        self.teacher = module.teacher
        self.student = module.student
        self.momentum = module.student_momentum  # the EMA copy, as the official 2q
        self.queue_t = module.queues.bank("teacher")
        self.queue_s = module.queues.bank("student")
        self.size = self.queue_t.shape[0]
        self.index = 0
        self.opt = torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = F.normalize(self.teacher(x), dim=1)
            k = F.normalize(self.momentum(x), dim=1)
        s = F.normalize(self.student(x), dim=1)
        queue_t = self.queue_t.clone().detach()
        queue_s = self.queue_s.clone().detach()
        loss = F.kl_div(F.log_softmax(torch.mm(s, queue_s.t()) / TEMPERATURE, dim=1),
                        F.softmax(torch.mm(t, queue_t.t()) / TEMPERATURE, dim=1), reduction="batchmean")
        with torch.no_grad():
            ids = (torch.arange(x.shape[0], device=x.device) + self.index) % self.size
            self.queue_t.index_copy_(0, ids, t)
            self.queue_s.index_copy_(0, ids, k)
            self.index = (self.index + x.shape[0]) % self.size
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        ema_update(self.momentum, self.student, 0.999)
        return loss.detach()


class Ours:
    """``CompReSS`` (ring write after the backward) with bf16 autocast, channels_last, optionally compiled."""

    def __init__(self, module: CompReSS, compile_backend: str | None):
        self.module = module.use_channels_last()
        self.opt = torch.optim.SGD(module.parameter_groups(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.student_fn = module.student
        self.compiled = False
        self.compile_backend = compile_backend
        self.compile_error = None
        if compile_backend:
            try:
                self.student_fn = torch.compile(module.student, backend=compile_backend)
                self.compiled = True
            except Exception as e:  # noqa: BLE001 - guarded: run eagerly and say why
                self.compile_error = first_line(e)

    def fall_back_to_eager(self, e: BaseException) -> None:
        self.compile_error = first_line(e)
        self.compiled = False
        self.student_fn = self.module.student
        self.module.queues._staged = None  # a half-done step may have staged keys
        self.opt.zero_grad(set_to_none=True)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            t = m.teacher_targets(x, None)
            s = self.student_fn(x)
            loss, _ = m.distill(x, s, t)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        m.queues.flush()
        ema_update(m.student_momentum, m.student, m.momentum)
        return loss.detach()


def time_steps(step, batches, warmup: int, steps: int, device: torch.device) -> dict:
    for i in range(warmup):
        step(batches[i % len(batches)])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step(batches[i % len(batches)])
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {"step_s": times, "step_s_median": med, "images_per_s": batches[0].shape[0] / med,
           "last_loss": float(loss)}
    if device.type == "cuda":
        out["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def count_flops(step, x: torch.Tensor) -> int | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            step(x)
        return int(fc.get_total_flops())
    except Exception as e:  # noqa: BLE001
        log(f"FLOP counting failed: {first_line(e)}")
        return None


def throughput(cfg: dict, device: torch.device, compile_backend: str | None) -> dict:
    batches = synthetic_batches(2, cfg, device, seed=3)
    res: dict = {}
    # (i) official style, fp32
    log("(b-i) official-style fp32 ...")
    official = OfficialStyle(build_module(cfg, device))
    flops = count_flops(official.step, batches[0])
    res["official_fp32"] = time_steps(official.step, batches, cfg["warmup"], cfg["steps"], device)
    res["official_fp32"]["queue_clone_per_step"] = True
    del official
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # (ii) ours
    log(f"(b-ii) ours: bf16 autocast + channels_last + compile ({compile_backend or 'off'}) ...")
    ours = Ours(build_module(cfg, device), compile_backend)
    t0 = time.perf_counter()
    try:
        r = time_steps(ours.step, batches, cfg["warmup"], cfg["steps"], device)
    except Exception as e:  # noqa: BLE001 - a compile failure at the first call: run eagerly instead
        if not ours.compiled:
            raise
        log(f"torch.compile failed ({first_line(e)}); running the student eagerly")
        traceback.print_exc()
        ours.fall_back_to_eager(e)
        r = time_steps(ours.step, batches, cfg["warmup"], cfg["steps"], device)
    r["warmup_and_timing_s"] = time.perf_counter() - t0
    backend_name = (compile_backend if compile_backend is None or isinstance(compile_backend, str)
                    else getattr(compile_backend, "__name__", repr(compile_backend)))
    r.update(compiled=ours.compiled, compile_backend=backend_name, compile_error=ours.compile_error,
             channels_last=True, autocast="bfloat16", queue_clone_per_step=False)
    res["ours_bf16_cl"] = r
    res["speedup"] = res["official_fp32"]["step_s_median"] / r["step_s_median"]
    res["flops_per_step"] = flops
    if flops:
        for k in ("official_fp32", "ours_bf16_cl"):
            res[k]["achieved_tflops"] = flops / res[k]["step_s_median"] / 1e12
    return res


def count_host_syncs(cfg: dict, device: torch.device, steps: int = 3) -> dict:
    """(c) Host synchronisations per training step of the library's own step (``CompReSS.training_step``, backward,
    SGD step, ``on_train_batch_end``: enqueue + EMA), counted with ``torch.cuda.set_sync_debug_mode("warn")``:
    every copy to the host or wait on the device warns once. Target: 0 (the non-finite-loss check reads a pinned
    copy a step late, the queue pointer stays on the device). On the CPU there is nothing to count (see
    ``tests/test_host_sync.py`` for the CPU-side proxy)."""
    if device.type != "cuda":
        return {"syncs_per_step": None, "note": "CPU: no device to synchronise with (tests/test_host_sync.py)"}
    import warnings

    module = build_module(cfg, device)
    module.train()
    opt = torch.optim.SGD(module.student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    batches = synthetic_batches(2, cfg, device, seed=5)
    labels = torch.zeros(cfg["batch"], dtype=torch.long, device=device)
    index = torch.arange(cfg["batch"], device=device)

    def one(i: int) -> None:
        batch = [batches[i % len(batches)], labels, index]
        loss = module.training_step(batch, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        module.on_train_batch_end(None, batch, i)

    one(0)  # warm-up (allocations, cuDNN autotuning) outside the counted region
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(1, steps + 1):
                one(i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    module.loss_watch.settle()
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    return {"syncs_per_step": len(syncs) / steps, "steps": steps, "first_messages": syncs[:5]}


# ------------------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    env = result["environment"]
    head = [f"### GPU check ({env.get('gpu', env['device'])}, torch {env['torch']}"
            f"{', SMOKE (CPU, tiny sizes)' if result['smoke'] else ''})", ""]
    input_lines = []
    if "input" in result:
        from gpu_check_input import markdown as input_markdown

        input_lines = input_markdown(result["input"])
    if "correctness" not in result:
        return "\n".join(head + input_lines) + "\n"
    c, t, cfg = result["correctness"], result["throughput"], result["config"]
    lines = [*head,
             f"Teacher ResNet-50 → student ResNet-18, {cfg['px']} px, batch {cfg['batch']}, queue {cfg['queue']}, "
             f"{cfg['steps']} timed steps after {cfg['warmup']} warm-up (medians).", "",
             "| check | value | bound | ok |", "|---|---|---|---|",
             f"| loss rel. error, bf16 autocast vs fp32 (full step) | {c['rel_err']:.2e} | < {c['bound']} | "
             f"{'yes' if c['rel_err'] < c['bound'] else 'NO'} |",
             f"| loss rel. error, loss fn on bf16-rounded embeddings | {c['loss_fn_only_rel_err']:.2e} | "
             f"< {c['bound']} | {'yes' if c['loss_fn_only_rel_err'] < c['bound'] else 'NO'} |",
             f"| grad rel. error (d loss / d student emb) | {c['grad_rel_err']:.2e} | (reported) | |", "",
             "| formulation | ms/step | images/s | TFLOP/s | peak GPU mem GB | notes |", "|---|---|---|---|---|---|"]
    for k, label in (("official_fp32", "official-style fp32 (queue clone, NCHW)"),
                     ("ours_bf16_cl", "ours bf16 autocast + channels_last")):
        r = t[k]
        tf = f"{r['achieved_tflops']:.3g}" if r.get("achieved_tflops") is not None else "n/a"
        mem = f"{r['peak_gpu_memory_bytes'] / 2**30:.1f}" if "peak_gpu_memory_bytes" in r else "n/a"
        note = ""
        if k == "ours_bf16_cl":
            note = (f"compiled ({r['compile_backend']})" if r["compiled"] else
                    f"eager (compile: {(r['compile_error'] or 'off').replace('|', '/')})")
        lines.append(f"| {label} | {1e3 * r['step_s_median']:.1f} | {r['images_per_s']:.0f} | {tf} | {mem} | {note} |")
    flops = t["flops_per_step"]
    tail = (f"; {flops / 1e9:,.1f} GFLOP per step (FlopCounterMode on the official-style step; the same model "
            f"FLOPs in both)." if flops else ".")
    lines += ["", f"Speed-up ours vs official-style: **{t['speedup']:.2f}x**{tail}"]
    hs = result.get("host_syncs") or {}
    if hs:
        n = hs.get("syncs_per_step")
        lines += ["", f"Host synchronisations per training step (torch.cuda.set_sync_debug_mode): "
                      f"{'n/a (' + hs.get('note', '') + ')' if n is None else f'{n:g} (target 0)'}"]
    return "\n".join(lines + input_lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny sizes, 32 px, 2 steps")
    ap.add_argument("--out", default=None, help="JSON path (a .md table is written next to it)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--queue", type=int, default=None)
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="torch.compile the student in (ii): auto = on (inductor on GPU, eager backend in --smoke)")
    ap.add_argument("--allow-cpu", action="store_true", help="run the full sizes without a GPU (very slow)")
    ap.add_argument("--skip-input", action="store_true", help="leave out (d) and (e), the input pipeline checks")
    ap.add_argument("--only-input", action="store_true", help="run (d) and (e) only (e.g. a second short call)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: 1 in --smoke, so that a busy shared machine cannot slow "
                         "it down 30x through contended OpenMP barriers; torch's default otherwise)")
    a = ap.parse_args(argv)
    threads = a.threads if a.threads is not None else (1 if a.smoke else None)
    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    cfg = dict(SMOKE if a.smoke else FULL)
    for k in ("steps", "warmup", "batch", "queue"):
        if getattr(a, k) is not None:
            cfg[k] = getattr(a, k)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    if device.type == "cpu" and not (a.smoke or a.allow_cpu):
        log("no CUDA device: run with --smoke (CPU smoke test) or on a machine with a GPU")
        return 2
    backend = None if a.compile == "off" else cfg["compile_backend"]
    out = Path(a.out) if a.out else Path(__file__).resolve().parent / "results" / (
        "gpu_check_smoke.json" if a.smoke else "gpu_check.json")

    env = environment(device)
    env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    env["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    log(f"device {device} ({env.get('gpu', env['cpu'])}), torch {env['torch']}, smoke={a.smoke}")
    result = {"environment": env, "smoke": a.smoke, "config": cfg}
    if not a.only_input:
        log("(a) bf16 autocast vs fp32 loss ...")
        correctness = check_correctness(cfg, device)
        log(f"    rel. error {correctness['rel_err']:.2e} (bound {BF16_REL_BOUND}); loss fn alone "
            f"{correctness['loss_fn_only_rel_err']:.2e}; grad {correctness['grad_rel_err']:.2e}")
        log("(c) host synchronisations per training step ...")
        host_syncs = count_host_syncs(cfg, device)
        log(f"    {host_syncs}")
        tp = throughput(cfg, device, backend)
        result.update(correctness=correctness, throughput=tp, host_syncs=host_syncs)
    if not a.skip_input:
        import tempfile

        from gpu_check_input import FULL_INPUT, SMOKE_INPUT, input_checks

        size = dict(SMOKE_INPUT if a.smoke else FULL_INPUT)
        with tempfile.TemporaryDirectory(prefix="gpu_check_input_") as work:
            result["input"] = {"config": size, **input_checks(size, device, Path(work), log)}
    env["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start
    md = markdown(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(md)
    print("\n" + md)
    log(f"total {result['wall_s']:.0f} s; saved {out} and {out.with_suffix('.md')}")
    if "correctness" in result and not result["correctness"]["passed"]:
        log(f"FAILED: bf16 relative error above the bound {BF16_REL_BOUND}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
