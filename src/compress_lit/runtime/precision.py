"""``trainer.precision=auto``: bf16 autocast where the hardware computes bf16 natively, fp32 where it does not.

Lightning does not know ``auto``, so it is resolved here, before any Trainer, Fabric or autocast context exists, by
every entry point: ``train`` and ``pretrain`` (:func:`apply_precision`, which writes the result back into the config,
so the run's logged hyperparameters and its checkpoint hold the precision it ran in, and logs one line saying which
and why), ``cache_features`` (the same, and :func:`resolved_precision` in ``local_device_and_autocast`` for the
in-training build) and ``reproduce`` (:func:`command_precision`: each run's command line carries the resolved value,
so a run's key and record name the precision it ran in).

The choice (:func:`choose_precision`) depends on the hardware only, never on a timing, so one machine always
resolves the same way:

* CPU: ``bf16-mixed`` where the CPU computes bf16 natively (x86: AVX512-BF16 or AMX-BF16; ARM64: the BF16
  extension), as ``torch.cpu.get_capabilities()`` reports it (the flags of ``/proc/cpuinfo`` on a torch without
  it); ``32-true`` otherwise. Without them oneDNN emulates bf16 with fp32 instructions: a CompReSS student's
  forward pass runs an order of magnitude slower than in fp32 (``benchmarks/bench_precision.py``). An
  ``ONEDNN_MAX_CPU_ISA`` below AVX512_CORE_BF16 counts as no native bf16: it is how that benchmark emulates an
  AVX2-only CPU.
* CUDA GPU: ``bf16-mixed`` where ``torch.cuda.is_bf16_supported()`` (Ampere and later), else ``32-true``: fp16
  autocast needs loss scaling and the CompReSS logits (similarity / 0.04) were only ever checked under bf16; ask for
  ``16-mixed`` explicitly to use it.
* Apple MPS: ``32-true``.

An explicit bf16 precision on a CPU without native bf16 runs as asked, with a warning that states the slowdown
measured at start-up (:func:`measure_bf16_slowdown`: a small conv net, fp32 against bf16 autocast, well under a
second), and how to avoid it.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

log = logging.getLogger("compress_lit.precision")

AUTO = "auto"
BF16_MIXED = "bf16-mixed"
FP32 = "32-true"
# what lightning.Trainer / Fabric accept as `precision` (lightning_fabric.connector._PRECISION_INPUT), as strings
LIGHTNING_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
                        "transformer-engine-float16", "32", "16", "64", "bf16")
PRECISIONS = (AUTO, *LIGHTNING_PRECISIONS)  # what the config accepts
# the CPU features that compute bf16 natively, by their names in torch.cpu.get_capabilities() / /proc/cpuinfo
NATIVE_BF16_FEATURES = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16", "bf16": "BF16", "sve_bf16": "SVE-BF16"}
# ONEDNN_MAX_CPU_ISA values (oneDNN's ISA names) that leave no native bf16 instruction to oneDNN
NO_BF16_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def is_bf16(precision: Any) -> bool:
    """A bf16 setting (``bf16-mixed``, ``bf16-true``, ``bf16``)."""
    return str(precision).startswith("bf16")


# ------------------------------------------------------------------------------------------------ the CPU
@dataclass(frozen=True)
class CPUInfo:
    name: str
    capability: str  # torch.backends.cpu.get_cpu_capability(): the kernels ATen dispatches to (AVX2, AVX512, ...)
    bf16_features: tuple[str, ...]  # the native bf16 features it has (display names), empty when none
    isa_cap: Optional[str] = None  # ONEDNN_MAX_CPU_ISA when it rules the bf16 instructions out

    @property
    def native_bf16(self) -> bool:
        return bool(self.bf16_features) and self.isa_cap is None

    def describe(self) -> str:
        """``Intel Xeon: torch CPU capability AVX512, AMX-BF16, AVX512-BF16`` (what the log lines and benchmarks
        state)."""
        feats = ", ".join(self.bf16_features) if self.bf16_features else "no AVX512-BF16 or AMX-BF16"
        cap = f", capped by ONEDNN_MAX_CPU_ISA={self.isa_cap}" if self.isa_cap else ""
        return f"{self.name}: torch CPU capability {self.capability}, {feats}{cap}"


def _proc_cpuinfo() -> tuple[str, set[str]]:
    """The model name and the feature flags of ``/proc/cpuinfo`` (x86 ``flags``, ARM64 ``Features``)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware") and not name:
                    name = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, flags


@functools.lru_cache(maxsize=None)
def cpu_info() -> CPUInfo:
    """This machine's CPU as far as bf16 goes (cached: the hardware does not change while a process runs)."""
    import torch

    name, flags = _proc_cpuinfo()
    caps = getattr(torch.cpu, "get_capabilities", None)  # /proc/cpuinfo's flags on a torch without it
    if caps is not None:
        c = caps()
        flags = {k for k, v in c.items() if v is True}
        name = name or str(c.get("cpu_name", ""))
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return CPUInfo(name=name or platform.processor() or platform.machine(),
                   capability=torch.backends.cpu.get_cpu_capability(),
                   bf16_features=tuple(sorted(label for flag, label in NATIVE_BF16_FEATURES.items() if flag in flags)),
                   isa_cap=cap.upper() if cap.upper() in NO_BF16_ONEDNN_ISAS else None)


def measure_bf16_slowdown(batch: int = 8, size: int = 28, reps: int = 3) -> float:
    """How many times slower a small conv net's forward pass runs under bf16 autocast than in fp32 on this CPU
    (fastest of ``reps`` after a warm-up; three 3x3 convolutions and a linear layer at 28 px, the students' scale).
    Well under a second even where bf16 is emulated."""
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(64, 64, 3, stride=2, padding=1), torch.nn.Flatten(),
                              torch.nn.Linear(64 * ((size + 1) // 2) ** 2, 128))
    x = torch.randn(batch, 3, size, size)
    best = {}
    with torch.no_grad():
        for bf16 in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                net(x)
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    net(x)
                    times.append(time.perf_counter() - t0)
            best[bf16] = min(times)
    return best[True] / best[False]


# ------------------------------------------------------------------------------------------------ the choice
@dataclass(frozen=True)
class PrecisionChoice:
    requested: str
    precision: str  # what Lightning gets
    device: str  # cpu | cuda | mps
    reason: str

    def line(self) -> str:
        if self.requested == AUTO:
            return f"trainer.precision=auto -> {self.precision} on the {self.device}: {self.reason}"
        return f"trainer.precision={self.precision} on the {self.device} (as set)"


def target_device(accelerator: Any = "auto") -> str:
    """The device a Trainer with ``accelerator`` runs on: ``cpu``, ``cuda`` or ``mps`` (``auto``: a CUDA GPU when
    one is visible, else MPS when available, else the CPU, as Lightning picks)."""
    from .startup import mps_available, visible_cuda_devices

    a = str(accelerator or "auto").lower()
    if a == "cpu":
        return "cpu"
    if a == "mps":
        return "mps"
    if visible_cuda_devices():
        return "cuda"
    return "mps" if mps_available() else "cpu"


def cuda_bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def choose_precision(requested: Any = AUTO, accelerator: Any = "auto", device: Optional[str] = None) -> PrecisionChoice:
    """What ``trainer.precision=requested`` runs as with ``trainer.accelerator=accelerator`` on this machine
    (``device``: the target device when already known). Anything but ``auto`` is kept as it is."""
    requested = str(requested)
    device = device or target_device(accelerator)
    if requested != AUTO:
        return PrecisionChoice(requested, requested, device, "as set")
    if device == "cuda":
        if cuda_bf16_supported():
            return PrecisionChoice(AUTO, BF16_MIXED, device, "this GPU supports bf16 (torch.cuda.is_bf16_supported)")
        return PrecisionChoice(AUTO, FP32, device, "this GPU has no bf16 (torch.cuda.is_bf16_supported() is False); "
                                                   "set trainer.precision=16-mixed for fp16 autocast")
    if device == "mps":
        return PrecisionChoice(AUTO, FP32, device, "bf16 autocast is not used on Apple MPS")
    cpu = cpu_info()
    if cpu.native_bf16:
        return PrecisionChoice(AUTO, BF16_MIXED, device, f"the CPU computes bf16 natively ({cpu.describe()})")
    return PrecisionChoice(AUTO, FP32, device, f"the CPU has no native bf16 ({cpu.describe()}), where bf16 autocast "
                                               "runs many times slower than fp32")


def resolved_precision(trainer_cfg: Any) -> str:
    """The precision a trainer config runs in (``auto`` resolved; Lightning's default ``32-true`` when unset),
    without logging: for code handed a config that an entry point may already have resolved."""
    trainer_cfg = trainer_cfg or {}
    return choose_precision(trainer_cfg.get("precision", FP32), trainer_cfg.get("accelerator", "auto")).precision


def bf16_slowdown_warning(choice: PrecisionChoice, key: str = "trainer.precision") -> Optional[str]:
    """The warning for an explicit bf16 precision on a CPU without native bf16 (None otherwise); measures the
    slowdown first (:func:`measure_bf16_slowdown`)."""
    if choice.requested == AUTO or choice.device != "cpu" or not is_bf16(choice.precision):
        return None
    cpu = cpu_info()
    if cpu.native_bf16:
        return None
    slowdown = measure_bf16_slowdown()
    return (f"{key}={choice.requested} on a CPU without native bf16 ({cpu.describe()}): bf16 is emulated here; a "
            f"start-up check ran a small conv net {slowdown:.1f}x slower under bf16 autocast than in fp32. Running "
            f"as asked; {key}=auto or {key}=32-true avoids it")


def apply_precision(trainer_cfg: Any, key: str = "trainer") -> PrecisionChoice:
    """Resolve ``<key>.precision`` of an entry point's trainer config in place (``auto`` becomes what it runs as,
    so the logged hyperparameters and the checkpoint record it), log one line saying which and why, and warn when
    an explicit bf16 precision meets a CPU without native bf16. Call it after ``check_accelerator`` and before
    the logger, the Trainer or Fabric is built."""
    from omegaconf import open_dict

    requested = trainer_cfg.get("precision", FP32) if trainer_cfg is not None else FP32
    choice = choose_precision(requested, trainer_cfg.get("accelerator", "auto") if trainer_cfg is not None else "auto")
    if trainer_cfg is not None and choice.precision != str(requested):
        with open_dict(trainer_cfg):
            trainer_cfg.precision = choice.precision
    log.info("precision: %s", choice.line().replace("trainer.", f"{key}.", 1))
    warning = bf16_slowdown_warning(choice, f"{key}.precision")
    if warning:
        log.warning(warning)
    return choice


# ------------------------------------------------------------------------------------------------ command lines
PRECISION_ARG = "trainer.precision="


def args_accelerator(args: Iterable[str]) -> str:
    """The accelerator a ``compress_lit.train`` / ``pretrain`` command line asks for: ``trainer.accelerator=``,
    else the trainer group's (``trainer=cpu``: cpu, ``trainer=gpu|ddp``: gpu), else ``auto`` (``trainer=default``)."""
    accel = "auto"
    for a in args:
        if a.startswith("trainer.accelerator="):
            return a.split("=", 1)[1]
        if a.startswith("trainer="):
            accel = {"cpu": "cpu", "gpu": "gpu", "ddp": "gpu"}.get(a.split("=", 1)[1], "auto")
    return accel


def command_precision(args: list[str], override: Optional[str] = None) -> tuple[list[str], Optional[PrecisionChoice]]:
    """A run's command line with its precision as it will run: ``override`` (when given) replaces the value of its
    ``trainer.precision=`` (appended when it has none), then ``auto`` is resolved for this machine, in place, so
    everything else keeps its position. Returns the new arguments and the choice (None: no precision argument)."""
    args = list(args)
    if override is not None:
        if any(a.startswith(PRECISION_ARG) for a in args):
            args = [f"{PRECISION_ARG}{override}" if a.startswith(PRECISION_ARG) else a for a in args]
        else:
            args.append(f"{PRECISION_ARG}{override}")
    choice = None
    for i, a in enumerate(args):
        if a.startswith(PRECISION_ARG):
            choice = choose_precision(a[len(PRECISION_ARG):], args_accelerator(args))
            args[i] = f"{PRECISION_ARG}{choice.precision}"
    return args, choice


def args_precision(args: Iterable[str]) -> Optional[str]:
    """The ``trainer.precision=`` value of a command line (None when it has none)."""
    return next((a[len(PRECISION_ARG):] for a in args if a.startswith(PRECISION_ARG)), None)


__all__ = ["AUTO", "BF16_MIXED", "CPUInfo", "FP32", "PRECISIONS", "PrecisionChoice", "apply_precision",
           "args_precision", "bf16_slowdown_warning", "choose_precision", "command_precision", "cpu_info",
           "measure_bf16_slowdown", "resolved_precision", "target_device"]
