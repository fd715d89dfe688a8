"""The export (``python -m compress_lit.export``): the file written atomically after its parity check passed,
the exported runtime's latency beside PyTorch's, the report (``export_report.json``, ``export_report.md``)."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from ..runtime.startup import check_mandatory
from .convert import (_first_conv_in_channels, _quiet, export_model, read_checkpoint_info, resolve_onnx_exporter,
                      teacher_from_config)
from .measure import (_threads, check_parity, count_flops, count_params, median_latency_ms, parity_inputs,
                      torch_latency_ms)
from .settings import ExportError, FORMATS, RUNTIME, SUFFIX

log = logging.getLogger("compress_lit.export")


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


def _atomic_target(path: Path) -> Iterator[Path]:
    from ..runtime.safety import atomic_target

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
    from ..evaluation.loading import load_model, resolve_data_config

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
             f"- file: `{_shown_path(r['output'])}` ({r['format']}, {r['exporter']}); input `{r['input_name']}` "
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



def _shown_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies inside it (a report names no machine's folders)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)

__all__ = ["load_runtime", "report_markdown", "run_export"]
