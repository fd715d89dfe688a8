"""`python -m compress_lit.export checkpoint=<distillation .ckpt> format=onnx|torchscript`: the student for the edge.

Exports the student's **backbone alone** — what every evaluation uses: the 1q projection, the momentum student
and the queues stay behind — with the input shape ``(1, C, image_size, image_size)`` of the checkpoint's data
config (``image_size=`` overrides it; ONNX gets a dynamic batch axis). The file is written to a temporary path
beside its destination, checked against PyTorch, and only then renamed into place (``os.replace``): a failed
export or a failed parity check never leaves a file where a good one was (or where none was).

Parity: the exported model (onnxruntime for ONNX, ``torch.jit.load`` for TorchScript) and the PyTorch model run
on random N(0, 1) batches (batch 1 and ``parity.random_batch``) and on real images of the checkpoint's val split
(synthetic pixels normalised with the data's mean/std when the data is not available here); it passes when
``max |exported - torch| <= parity.tolerance * max |torch|`` (the output scale) over all of them.

Report (printed, and written as ``export_report.json`` / ``export_report.md`` to the run directory): parameters,
file size, FLOPs per image (``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-add of the
convolutions and matrix products) and CPU latency per image at batch 1 (median of ``latency.runs`` runs, PyTorch
eager and the exported runtime) of the student and of its teacher's architecture (``teacher.*`` of the checkpoint's
config; built with random weights when the teacher's checkpoint file is not available here — FLOPs, parameters and
latency do not depend on the weights; the report says which). The teacher is exported to a temporary file to time
it in the same runtime (``teacher_runtime=false`` skips that).

``onnx_exporter``: ``dynamo`` (``torch.export``-based; needs the ``onnxscript`` package), ``legacy`` (the
TorchScript-based ``torch.onnx.export(dynamo=False)``), or ``auto`` (dynamo when onnxscript is importable).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf
from torch import nn

from .runtime.paths import config_dir
from .runtime.safety import load_torch_file
from .runtime.startup import USER_ERRORS, check_mandatory, entry_main, run_entry

log = logging.getLogger("compress_lit.export")
CONF_DIR = config_dir()  # conf/ of the checkout, or compress_lit/conf of an installed wheel
FORMATS = ("onnx", "torchscript")
ONNX_EXPORTERS = ("auto", "dynamo", "legacy")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
RUNTIME = {"onnx": "onnxruntime", "torchscript": "torchscript"}


class ExportError(RuntimeError):
    """The export cannot be made or does not match PyTorch; the message names the file / the numbers."""


# ------------------------------------------------------------------------------------------------------------
# config schema
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ParitySettings:
    tolerance: float = 1e-4  # max |exported - torch| <= tolerance * max |torch| (the output scale)
    random_inputs: int = 2  # random N(0, 1) batches of each size (batch 1 and random_batch)
    random_batch: int = 3  # the second random batch size (ONNX: exercises the dynamic batch axis)
    real_inputs: int = 8  # val images of the checkpoint's data (synthetic pixels when unavailable); 0: none


@dataclass
class LatencySettings:
    runs: int = 50  # timed runs at batch 1; the median is reported
    warmup: int = 5
    threads: Optional[int] = 1  # intra-op threads of torch and onnxruntime (None: torch's default count)


@dataclass
class ExportConfig:
    checkpoint: str = MISSING  # a compress_lit distillation (student.*) or pretraining (backbone.*) checkpoint
    format: str = "onnx"  # onnx | torchscript
    output: Optional[str] = None  # None: <run dir>/<student name>.onnx|.torchscript.pt; a folder: that name in it
    image_size: Optional[int] = None  # None: the checkpoint's data.image_size
    dynamic_batch: bool = True  # ONNX: dynamic batch axis
    opset: int = 18
    onnx_exporter: str = "auto"  # auto | dynamo | legacy
    parity: ParitySettings = field(default_factory=ParitySettings)
    latency: LatencySettings = field(default_factory=LatencySettings)
    compare_teacher: bool = True  # report the teacher's architecture beside the student
    teacher_runtime: bool = True  # also export the teacher (temporary file) to time it in the exported runtime
    seed: int = 0


def register_export_configs() -> None:
    ConfigStore.instance().store(name="export_schema", node=ExportConfig)


register_export_configs()


# ------------------------------------------------------------------------------------------------------------
# reading the checkpoint
# ------------------------------------------------------------------------------------------------------------
def read_checkpoint_info(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """(the resolved training config, the top-level state_dict prefixes) of one of our checkpoints, read lazily
    (memory-mapped: the queues of a large checkpoint are not read)."""
    p = Path(os.path.expanduser(str(path)))
    ckpt = load_torch_file(p, "checkpoint", mmap=True)  # weights only: a malicious file runs nothing
    try:
        config = ckpt["hyper_parameters"]["config"]
        state = ckpt["state_dict"]
    except (KeyError, TypeError) as e:
        raise ExportError(f"checkpoint {p} is not a compress_lit checkpoint (need 'state_dict' and "
                          f"'hyper_parameters.config'; missing {e})") from e
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    prefixes = sorted({k.split(".", 1)[0] for k in state})
    return dict(config), prefixes


def _first_conv_in_channels(model: nn.Module) -> Optional[int]:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return None


def teacher_from_config(config: dict) -> tuple[Optional[nn.Module], str, str]:
    """(the teacher's backbone or None, its name, how its weights were obtained) from a training config.

    The weights are loaded (``compress_lit.teachers.build_teacher``, strict) when the teacher's checkpoint is
    readable here; otherwise the architecture is built with random weights and the note (starting with
    ``"random weights"``) says why. None when the config records no teacher (a pretraining checkpoint)."""
    from .models import build_from_config

    t = config.get("teacher")
    if not t or not t.get("arch"):
        return None, "", "the checkpoint records no teacher"
    name = t.get("name") or t["arch"]
    kw = dict(small_input=bool(t.get("small_input", False)), width_multiplier=t.get("width_multiplier"),
              embedding=t.get("embedding"), vit=t.get("vit"))
    path, fmt = t.get("checkpoint"), t.get("format") or "torchvision"
    note = None
    if fmt == "timm":  # timm builds it: its weights from the file or the Hugging Face cache, else random
        from .models.timm_backbone import TimmBackbone, create
        from .teachers import TeacherLoadError, build_teacher

        try:
            teacher = build_teacher(OmegaConf.create({"name": name, "arch": "timm", "format": "timm",
                                                      "checkpoint": path, "embedding": t.get("embedding")}))
            return teacher.backbone.eval(), name, f"timm {name}, pretrained weights"
        except TeacherLoadError as e:
            return (TimmBackbone(create(name, pretrained=False), name, t.get("embedding")).eval(), name,
                    f"random weights: loading timm's {name} failed ({e})")
    if fmt == "random":
        note = "random weights (teacher.format=random)"
    elif not path:
        note = "random weights (the config gives no teacher checkpoint)"
    elif not Path(os.path.expanduser(str(path))).is_file():
        note = f"random weights: teacher checkpoint {path} not found here"
    if note is None:
        from .teachers import TeacherLoadError, build_teacher

        try:
            teacher = build_teacher(OmegaConf.create({"name": name, "arch": t["arch"], "format": fmt,
                                                      "checkpoint": str(path), **kw}))
            return teacher.backbone.eval(), name, f"loaded from {path} (format {fmt})"
        except TeacherLoadError as e:
            note = f"random weights: loading {path} failed ({e})"
    return build_from_config({"arch": t["arch"], **kw}).eval(), name, note


# ------------------------------------------------------------------------------------------------------------
# exporting
# ------------------------------------------------------------------------------------------------------------
@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' and torch.jit's deprecation / tracer chatter (the parity check is what counts)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def resolve_onnx_exporter(choice: str) -> str:
    if choice not in ONNX_EXPORTERS:
        raise ExportError(f"onnx_exporter={choice!r} is invalid: choose one of {list(ONNX_EXPORTERS)}")
    have = importlib.util.find_spec("onnxscript") is not None
    if choice == "dynamo" and not have:
        raise ExportError("onnx_exporter=dynamo needs the onnxscript package (pip install onnxscript), or use "
                          "onnx_exporter=legacy")
    if choice == "auto":
        return "dynamo" if have else "legacy"
    return choice


def _uniform_windows(n: int, m: int) -> Optional[tuple[int, int]]:
    """(kernel, stride) of a plain pooling with exactly the windows of adaptive pooling ``n -> m``, or None.

    Adaptive pooling's window i is ``[floor(i n / m), ceil((i + 1) n / m))``."""
    starts = [(i * n) // m for i in range(m)]
    ends = [-(-((i + 1) * n) // m) for i in range(m)]
    sizes = {e - s for s, e in zip(starts, ends)}
    strides = {b - a for a, b in zip(starts, starts[1:])}
    if len(sizes) != 1 or len(strides) > 1:
        return None
    k = sizes.pop()
    return k, (strides.pop() if strides else k)


def static_adaptive_pools(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` whose adaptive max/avg pools are plain pools with the same windows at the export's
    fixed spatial size (ONNX has no adaptive max pool, and no adaptive avg pool whose output size does not divide
    its input: e.g. AlexNet's pool5, 6x6 from 13x13 = MaxPool2d(3, stride 2)). Global average pools (output 1)
    stay (ONNX GlobalAveragePool). Returns the copy and a note per replaced module."""
    import copy

    kinds = (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: sizes.__setitem__(name, tuple(inp[0].shape[-2:])))
             for name, m in model.named_modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    if not sizes:
        return model, []
    model = copy.deepcopy(model)
    notes = []
    for name, (h, w) in sizes.items():
        mod = model.get_submodule(name)
        out = mod.output_size if isinstance(mod.output_size, tuple) else (mod.output_size, mod.output_size)
        oh, ow = (o if o is not None else i for o, i in zip(out, (h, w)))
        if isinstance(mod, nn.AdaptiveAvgPool2d) and oh == ow == 1:
            continue
        wh, ww = _uniform_windows(h, oh), _uniform_windows(w, ow)
        if wh is None or ww is None:
            continue  # left as is: the exporter decides (and says so)
        kind = nn.MaxPool2d if isinstance(mod, nn.AdaptiveMaxPool2d) else nn.AvgPool2d
        new = kind(kernel_size=(wh[0], ww[0]), stride=(wh[1], ww[1]))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        notes.append(f"{name}: {type(mod).__name__}({oh}x{ow}) on {h}x{w} exported as {kind.__name__}"
                     f"(kernel {wh[0]}x{ww[0]}, stride {wh[1]}x{ww[1]}) (the same windows at this input size)")
    return model, notes


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, *, dynamic_batch: bool = True,
                opset: int = 18, exporter: str = "auto") -> tuple[str, list[str]]:
    """Write ``model`` as ONNX (input ``input``, output ``embedding``); returns the exporter used and the notes
    of :func:`static_adaptive_pools` and of a ViT's ``for_input_size`` (the spatial size is fixed; only the batch
    axis is dynamic)."""
    if importlib.util.find_spec("onnx") is None:
        raise ExportError("format=onnx needs the onnx package (pip install onnx onnxruntime)")
    exporter = resolve_onnx_exporter(exporter)
    model, notes = static_adaptive_pools(model, example)
    if hasattr(model, "for_input_size"):  # ViTs: the position table at the export's grid (no bicubic resize op)
        model, note = model.for_input_size(*example.shape[-2:])
        notes += [note] if note else []
    names = dict(input_names=["input"], output_names=["embedding"])
    try:
        with _quiet(), torch.no_grad():
            if exporter == "dynamo":
                shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
                prog = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                         verbose=False, **names)
                prog.save(str(path), external_data=False)
            else:
                axes = {"input": {0: "batch"}, "embedding": {0: "batch"}} if dynamic_batch else None
                torch.onnx.export(model, (example,), str(path), dynamo=False, dynamic_axes=axes,
                                  opset_version=opset, do_constant_folding=True, **names)
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise ExportError(f"the {exporter} ONNX exporter failed on {type(model).__name__} with input "
                          f"{tuple(example.shape)}: {type(e).__name__}: {msg[0] if msg else ''}") from e
    return exporter, notes


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> str:
    """Trace ``model`` on ``example`` and save it (``torch.jit.load`` reads it, no Python class needed)."""
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))
    return "torch.jit.trace"


def load_runtime(fmt: str, path: str | os.PathLike, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported file as a function ``x -> embedding`` in its own runtime (onnxruntime / torch.jit.load)."""
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(sess.run(None, {name: x.detach().cpu().numpy()})[0])

        return run
    with _quiet():
        mod = torch.jit.load(str(path), map_location="cpu").eval()

    def run_ts(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return mod(x)

    return run_ts


def export_model(fmt: str, model: nn.Module, example: torch.Tensor, path: str | os.PathLike, cfg: Any
                 ) -> tuple[str, list[str]]:
    """Export in ``fmt``; returns a description of the exporter and notes on graph rewrites."""
    if fmt == "onnx":
        ex, notes = export_onnx(model, example, path, dynamic_batch=cfg.dynamic_batch, opset=cfg.opset,
                                exporter=cfg.onnx_exporter)
        return f"torch.onnx ({'torch.export-based' if ex == 'dynamo' else 'TorchScript-based, legacy'}), " \
               f"opset {cfg.opset}", notes
    return export_torchscript(model, example, path), []


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
            from .data import build_datamodule

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


def _atomic_target(path: Path) -> Iterator[Path]:
    from .runtime.safety import atomic_target

    return atomic_target(path)


def _versions(fmt: str) -> dict[str, str]:
    v = {"torch": torch.__version__}
    if fmt == "onnx":
        for mod in ("onnx", "onnxruntime", "onnxscript"):
            if importlib.util.find_spec(mod) is not None:
                v[mod] = getattr(__import__(mod), "__version__", "?")
    return v


def _human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _human(n: Optional[float], unit: str = "") -> str:
    if n is None:
        return "—"
    for scale, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {s}{unit}"
    return f"{n:.0f} {unit}".strip()


# ------------------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------------------
def _output_path(cfg: Any, run_dir: Path, name: str) -> Path:
    default = f"{name}{SUFFIX[cfg.format]}"
    if not cfg.output:
        return run_dir / default
    out = Path(os.path.expanduser(str(cfg.output)))
    if out.is_dir() or str(cfg.output).endswith(("/", os.sep)):
        return out / default
    return out


def _check_cfg(cfg: Any) -> None:
    check_mandatory(cfg)  # checkpoint= (a ConfigError naming the key, not OmegaConf's MissingMandatoryValue)
    if cfg.format not in FORMATS:
        raise ExportError(f"format={cfg.format!r} is invalid: choose one of {list(FORMATS)}")
    if cfg.format == "onnx":
        resolve_onnx_exporter(cfg.onnx_exporter)
    if cfg.image_size is not None and cfg.image_size <= 0:
        raise ExportError(f"image_size={cfg.image_size} is invalid: it must be > 0")
    if cfg.parity.tolerance <= 0:
        raise ExportError(f"parity.tolerance={cfg.parity.tolerance} is invalid: it must be > 0")
    if cfg.latency.runs <= 0 or cfg.latency.warmup < 0:
        raise ExportError("latency.runs must be > 0 and latency.warmup >= 0")


def _model_row(role: str, name: str, arch: str, model: nn.Module, example: torch.Tensor, lat: Any,
               runtime: str, run_exported: Optional[Callable], file_bytes: Optional[int], weights: str
               ) -> dict[str, Any]:
    row: dict[str, Any] = {"model": role, "name": name, "arch": arch, "weights": weights,
                           "params": count_params(model), "file_bytes": file_bytes,
                           "flops_per_image": count_flops(model, example),
                           "latency_ms": {"pytorch": torch_latency_ms(model, example, lat.runs, lat.warmup)}}
    if run_exported is not None:
        row["latency_ms"][runtime] = median_latency_ms(lambda: run_exported(example), lat.runs, lat.warmup)
    return row


def run_export(cfg: Any, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Export the student of ``cfg.checkpoint`` (an :class:`ExportConfig`), check it, write the report; return it."""
    from .evaluation.loading import load_model, resolve_data_config

    _check_cfg(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(os.path.expanduser(str(cfg.checkpoint)))
    config, prefixes = read_checkpoint_info(ckpt)  # fails naming the path when it is missing
    torch.manual_seed(cfg.seed)
    loaded = load_model(str(ckpt), "student")
    model = loaded.model.eval()
    data_cfg = resolve_data_config(loaded.data, None) if loaded.data else None
    size = int(cfg.image_size or (data_cfg.image_size if data_cfg is not None else 0))
    if size <= 0:
        raise ExportError(f"checkpoint {ckpt} records no data config: pass image_size=")
    channels = int(data_cfg.in_channels) if data_cfg is not None else (_first_conv_in_channels(model) or 3)
    conv_c = _first_conv_in_channels(model)
    if conv_c is not None and conv_c != channels:
        raise ExportError(f"checkpoint {ckpt}: data.in_channels={channels} but the student's first convolution "
                          f"takes {conv_c} channels")
    example = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(cfg.seed))
    student_key = "backbone" if "backbone" in prefixes and "student" not in prefixes else "student"
    dropped = [f"{p}.*" for p in prefixes if p != student_key]
    embed_dim = int(getattr(model, "embed_dim", 0)) or None
    name = loaded.name
    out = _output_path(cfg, run_dir, f"student_{name}")
    runtime = RUNTIME[cfg.format]
    print(f"[compress_lit.export] {ckpt}: {name} ({loaded.arch}), input {tuple(example.shape)}; exporting "
          f"{student_key}.* ({'dropped: ' + ', '.join(dropped) if dropped else 'nothing else in the file'}) "
          f"as {cfg.format}", flush=True)

    with _threads(cfg.latency.threads) as threads:
        inputs, real_what = parity_inputs((channels, size, size), cfg.parity, data_cfg, seed=cfg.seed)
        with _atomic_target(out) as tmp:
            exporter, rewrites = export_model(cfg.format, model, example, tmp, cfg)
            run_exported = load_runtime(cfg.format, tmp, threads)
            parity = check_parity(model, run_exported, inputs, cfg.parity.tolerance)
            out_dim = int(run_exported(example).shape[-1])
            parity["output_dim"] = out_dim
            if embed_dim is not None and out_dim != embed_dim:
                parity["passed"] = False
                parity["error"] = f"output dim {out_dim} != the student's embed_dim {embed_dim}"
            _print_parity(parity, cfg.format, runtime)
            if not parity["passed"]:
                raise ExportError(f"the {cfg.format} export of {ckpt} does not match PyTorch: max |diff| "
                                  f"{parity['max_abs_diff']:.3g} > allowed {parity['allowed']:.3g} "
                                  f"({parity.get('error', 'tolerance ' + str(cfg.parity.tolerance))}); "
                                  f"nothing written to {out}")
        # renamed into place: `out` now holds the checked export (the runtime keeps its loaded copy)
        print(f"[compress_lit.export] wrote {out}", flush=True)
        rows = [_model_row("student", name, loaded.arch, model, example, cfg.latency, runtime, run_exported,
                           out.stat().st_size, f"loaded from {ckpt} ({student_key}.*)")]
        rows[0]["file"] = str(out)
        teacher_note = None
        if cfg.compare_teacher:
            teacher, tname, teacher_note = teacher_from_config(config)
            if teacher_note.startswith("random weights"):
                teacher_note += " — FLOPs, parameters and latency do not depend on the weights"
            if teacher is not None:
                rows.append(_teacher_row(cfg, teacher, tname, config["teacher"]["arch"], example, runtime,
                                         threads, run_dir, teacher_note))
    report = {
        "checkpoint": str(ckpt), "format": cfg.format, "output": str(out), "exporter": exporter,
        "runtime": runtime, "input_shape": list(example.shape), "input_name": "input", "output_name": "embedding",
        "dynamic_batch": bool(cfg.dynamic_batch) if cfg.format == "onnx" else False,
        "graph_rewrites": rewrites, "output_dim": out_dim, "student_embed_dim": embed_dim,
        "exported_keys": f"{student_key}.*",
        "dropped_keys": dropped, "data": data_cfg.name if data_cfg is not None else None,
        "parity": {**parity, "real_inputs": real_what},
        "latency": {"batch": 1, "runs": int(cfg.latency.runs), "warmup": int(cfg.latency.warmup),
                    "threads": int(threads), "statistic": "median", "device": "cpu"},
        "flops_counter": "torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add; convolutions and "
                         "matrix products)",
        "models": rows, "teacher_note": teacher_note, "versions": _versions(cfg.format),
    }
    md = report_markdown(report)
    (run_dir / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (run_dir / "export_report.md").write_text(md + "\n")
    print("\n" + md + "\n", flush=True)
    return report


def _teacher_row(cfg, teacher, tname, arch, example, runtime, threads, run_dir, note) -> dict[str, Any]:
    run_t, tbytes = None, None
    if cfg.teacher_runtime:
        with tempfile.TemporaryDirectory(prefix=".teacher_export_", dir=run_dir) as d:
            path = Path(d) / f"teacher{SUFFIX[cfg.format]}"
            try:
                export_model(cfg.format, teacher, example, path, cfg)
                tbytes = path.stat().st_size
                run_t = load_runtime(cfg.format, path, threads)
                row = _model_row("teacher", tname, arch, teacher, example, cfg.latency, runtime, run_t, tbytes,
                                 note)
            except Exception as e:  # the comparison row must not sink the student's export
                log.warning("exporting the teacher for timing failed: %s", e)
                row = _model_row("teacher", tname, arch, teacher, example, cfg.latency, runtime, None, None, note)
                row["runtime_error"] = f"{type(e).__name__}: {e}"
        row["file_note"] = "temporary export for timing, not kept"
        return row
    return _model_row("teacher", tname, arch, teacher, example, cfg.latency, runtime, None, None, note)


def _print_parity(p: dict[str, Any], fmt: str, runtime: str) -> None:
    status = "OK" if p["passed"] else "FAILED"
    print(f"[compress_lit.export] parity {fmt} ({runtime}) vs PyTorch: max |diff| = {p['max_abs_diff']:.3g} over "
          f"{len(p['checks'])} batches; output scale max |torch| = {p['output_scale']:.4g}; allowed = tolerance "
          f"{p['tolerance']:g} x scale = {p['allowed']:.3g} (relative {p['relative']:.2e}): {status}"
          + (f" — {p['error']}" if "error" in p else ""), flush=True)


def report_markdown(r: dict[str, Any]) -> str:
    rt = r["runtime"]
    rt_name = {"onnxruntime": "ONNX Runtime", "torchscript": "TorchScript"}[rt]
    lat = r["latency"]
    head = ["model", "arch", "params", "file size", "FLOPs / image", "PyTorch (ms)", f"{rt_name} (ms)"]
    rows = []
    for m in r["models"]:
        lm = m["latency_ms"]
        size = _human_bytes(m.get("file_bytes")) + (" (temp)" if m["model"] == "teacher" and m.get("file_bytes")
                                                    else "")
        rows.append([f"{m['model']} ({m['name']})", m["arch"], f"{m['params']:,}", size,
                     _human(m["flops_per_image"], "FLOP"), f"{lm['pytorch']:.3f}",
                     f"{lm[rt]:.3f}" if rt in lm else "—"])
    if len(r["models"]) == 2:
        s, t = r["models"]

        def ratio(a, b):
            return f"{a / b:.1f}x" if a and b else "—"

        rows.append(["teacher / student", "", ratio(t["params"], s["params"]),
                     ratio(t.get("file_bytes"), s.get("file_bytes")),
                     ratio(t["flops_per_image"], s["flops_per_image"]),
                     ratio(t["latency_ms"]["pytorch"], s["latency_ms"]["pytorch"]),
                     ratio(t["latency_ms"].get(rt), s["latency_ms"].get(rt))])
    w = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
    right = [False, False, True, True, True, True, True]
    fmt_row = lambda cells: "| " + " | ".join(f"{c:>{w[i]}}" if right[i] else f"{c:<{w[i]}}"
                                              for i, c in enumerate(cells)) + " |"  # noqa: E731
    sep = "|" + "|".join(("-" * (w[i] + 1) + ":") if right[i] else "-" * (w[i] + 2) for i in range(len(head))) + "|"
    p = r["parity"]
    lines = [f"## Export of {r['checkpoint']}", "",
             f"- file: `{r['output']}` ({r['format']}, {r['exporter']}); input `{r['input_name']}` "
             f"{tuple(r['input_shape'])}{' with a dynamic batch axis' if r['dynamic_batch'] else ''}, output "
             f"`{r['output_name']}` ({r['output_dim']}-d)",
             f"- exported: {r['exported_keys']} (the backbone); left out: "
             f"{', '.join(r['dropped_keys']) if r['dropped_keys'] else 'nothing'}",
             f"- parity vs PyTorch ({rt}): max |diff| {p['max_abs_diff']:.3g}, output scale {p['output_scale']:.4g}, "
             f"allowed {p['tolerance']:g} x scale = {p['allowed']:.3g}: {'OK' if p['passed'] else 'FAILED'} "
             f"({len(p['checks'])} batches: random N(0,1) and {p['real_inputs']})",
             f"- latency: CPU, batch 1, median of {lat['runs']} runs after {lat['warmup']} warm-up, "
             f"{lat['threads']} thread(s); FLOPs: {r['flops_counter']}"]
    for note in r.get("graph_rewrites") or []:
        lines.append(f"- graph rewrite: {note}")
    if r.get("teacher_note"):
        lines.append(f"- teacher: {r['teacher_note']}")
    lines += ["", fmt_row(head), sep, *[fmt_row(x) for x in rows]]
    return "\n".join(lines)


__all__ = ["ExportConfig", "ExportError", "LatencySettings", "ParitySettings", "check_parity", "count_flops",
           "count_params", "export_onnx", "export_torchscript", "load_runtime", "read_checkpoint_info",
           "register_export_configs", "report_markdown", "run_export", "static_adaptive_pools",
           "teacher_from_config"]


@entry_main("export")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.WARNING)
    run_entry("export", lambda: run_export(cfg, HydraConfig.get().runtime.output_dir),
              user_errors=(*USER_ERRORS, ExportError, ValueError))


if __name__ == "__main__":
    main()

