"""A checkpoint's network to a deployable file: the student (and the teacher) rebuilt from the checkpoint's
config, ONNX (adaptive pools made static where the exporter needs it) or TorchScript."""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..runtime.safety import load_torch_file
from .settings import ExportError, ONNX_EXPORTERS

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
    from ..models import build_from_config

    t = config.get("teacher")
    if not t or not t.get("arch"):
        return None, "", "the checkpoint records no teacher"
    name = t.get("name") or t["arch"]
    kw = dict(small_input=bool(t.get("small_input", False)), width_multiplier=t.get("width_multiplier"),
              embedding=t.get("embedding"), vit=t.get("vit"))
    path, fmt = t.get("checkpoint"), t.get("format") or "torchvision"
    note = None
    if fmt == "timm":  # timm builds it: its weights from the file or the Hugging Face cache, else random
        from ..models.timm_backbone import TimmBackbone, create
        from ..teachers import TeacherLoadError, build_teacher

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
        from ..teachers import TeacherLoadError, build_teacher

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


def export_model(fmt: str, model: nn.Module, example: torch.Tensor, path: str | os.PathLike, cfg: Any
                 ) -> tuple[str, list[str]]:
    """Export in ``fmt``; returns a description of the exporter and notes on graph rewrites."""
    if fmt == "onnx":
        ex, notes = export_onnx(model, example, path, dynamic_batch=cfg.dynamic_batch, opset=cfg.opset,
                                exporter=cfg.onnx_exporter)
        return f"torch.onnx ({'torch.export-based' if ex == 'dynamo' else 'TorchScript-based, legacy'}), " \
               f"opset {cfg.opset}", notes
    return export_torchscript(model, example, path), []
