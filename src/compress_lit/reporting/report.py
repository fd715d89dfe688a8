"""The report of finished runs (``python -m compress_lit.report``): each run's key configuration, overrides,
results, learning curves and cluster pictures, a comparison table over several runs; Markdown and HTML."""
from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .end_of_run import (CLUSTER_CONFUSION, CLUSTER_GRID, LEARNING_CURVES, RESULT_METRICS, find_metrics_csv,
                         plot_learning_curves, read_metrics_csv)

KNOWN_IMAGES = {LEARNING_CURVES: "learning curves", CLUSTER_GRID: "cluster grid (val images by k-means cluster)",
                CLUSTER_CONFUSION: "cluster -> class confusion (val)"}


MISSING = "—"


# ------------------------------------------------------------------------------------------------ reading
def _load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    if not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _get(d: Any, dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def normalize_results(results: dict) -> dict[str, dict[str, float]]:
    """``{model: {metric: value}}`` from a `train`/`pretrain` ``results.json`` (already that shape) or an
    `evaluate` one (``knn`` / ``cluster`` / ``linear`` / ``voc`` sections of one model)."""
    if not results:
        return {}
    if all(isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()) for v in results.values()):
        return {m: {k: float(x) for k, x in row.items()} for m, row in results.items()}
    row: dict[str, float] = {}
    for key, v in (results.get("knn") or {}).items():
        m = re.fullmatch(r"top1_k(\d+)", key)
        if m:
            row[f"{m.group(1)}-NN"] = float(v)
    if isinstance(results.get("cluster"), dict):
        row["cluster"] = float(results["cluster"]["acc_mean"])
        row["cluster_std"] = float(results["cluster"].get("acc_std", 0.0))
    if isinstance(results.get("linear"), dict) and "top1" in results["linear"]:
        row["linear"] = float(results["linear"]["top1"])
    if isinstance(results.get("voc"), dict) and "mAP" in results["voc"]:
        row["VOC07 mAP"] = float(results["voc"]["mAP"])
    name = results.get("arch", "model")
    if results.get("layer"):
        name = f"{name} ({results['layer']})"
    return {name: row} if row else {}


def key_config(cfg: Optional[dict]) -> dict[str, str]:
    """The settings a reader compares runs by (``—`` where a run has none, e.g. a pretraining's teacher)."""
    cfg = cfg or {}

    def fmt(v: Any) -> str:
        return MISSING if v is None else str(v)

    t, s, d = cfg.get("teacher"), cfg.get("student") or _get(cfg, "model"), cfg.get("data") or {}
    teacher = MISSING
    if isinstance(t, dict):
        teacher = f"{t.get('name')} ({t.get('arch')}, {t.get('format')}{', cached' if t.get('cached') else ''})"
    student = MISSING
    if isinstance(s, dict) and s.get("arch"):
        w = s.get("width_multiplier")
        student = f"{s.get('name', s.get('arch'))} ({s.get('arch')}{f', ×{w}' if w not in (None, 1, 1.0) else ''})"
    temp = _get(cfg, "method.temperature")
    st = _get(cfg, "method.student_temperature")
    if temp is not None and st is not None and st != temp:
        temp = f"{temp} (student {st})"
    data = MISSING
    if d.get("name"):
        data = f"{d['name']} ({d.get('image_size')} px"
        for key, what in (("train_subset", "train"), ("val_subset", "val")):
            if d.get(key):
                data += f", {d[key]} {what}"
        data += ")"
    return {"teacher": teacher, "student": student, "method": fmt(_get(cfg, "method.name")),
            "queue": fmt(_get(cfg, "method.queue_size")), "temperature": fmt(temp),
            "epochs": fmt(_get(cfg, "optim.epochs")), "lr": fmt(_get(cfg, "optim.lr")),
            "batch": fmt(d.get("batch_size")), "data": data, "seed": fmt(cfg.get("seed"))}


@dataclass
class Run:
    path: Path
    label: str
    config: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)  # file name -> path
    wandb_runs: list[Path] = field(default_factory=list)


def load_run(path: str | Path, label: Optional[str] = None, curves_dir: Optional[Path] = None) -> Run:
    """Read a run directory. Without ``learning_curves.png`` but with a ``metrics.csv``, the curves are drawn
    into ``curves_dir`` (default: the run directory)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: {'no such folder' if not path.exists() else 'not a folder'} (pass run "
                                f"directories such as outputs/train/<date>/<time>)")
    run = Run(path=path, label=label or path.name)
    run.config = _load_yaml(path / ".hydra" / "config.yaml") or {}
    run.overrides = [str(o) for o in (_load_yaml(path / ".hydra" / "overrides.yaml") or [])]
    results_file = path / "results.json"
    raw = json.loads(results_file.read_text()) if results_file.is_file() else {}
    run.results = normalize_results(raw)
    images = {p.name: p for p in sorted(path.glob("*.png"))}
    if LEARNING_CURVES not in images:
        csv_path = find_metrics_csv(path)
        if csv_path is not None:
            out_dir = Path(curves_dir) if curves_dir is not None else path
            out_dir.mkdir(parents=True, exist_ok=True)
            out = plot_learning_curves(out_dir / f"{_slug(run.label)}_{LEARNING_CURVES}", read_metrics_csv(csv_path),
                                       run.results or None, title=run.label)
            if out is not None:
                images[LEARNING_CURVES] = out
    ordered = {k: images[k] for k in KNOWN_IMAGES if k in images}
    ordered.update({k: v for k, v in images.items() if k not in ordered})
    run.images = ordered
    run.wandb_runs = sorted((path / "wandb").glob("*run-*")) if (path / "wandb").is_dir() else []
    return run


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


# ------------------------------------------------------------------------------------------------ content
def _num(v: Optional[float], std: Optional[float] = None) -> str:
    if v is None:
        return MISSING
    return f"{v:.2f}" + (f" ± {std:.1f}" if std is not None else "")


def _metrics(results: dict[str, dict[str, float]]) -> list[str]:
    keys: list[str] = []
    for row in results.values():
        keys += [k for k in row if k not in keys and k != "cluster_std"]
    return [k for k in RESULT_METRICS if k in keys] + [k for k in keys if k not in RESULT_METRICS]


def results_rows(results: dict[str, dict[str, float]]) -> tuple[list[str], list[list[str]]]:
    metrics = _metrics(results)
    heads = ["model", *[("cluster (mean ± std)" if m == "cluster" else m) for m in metrics]]
    rows = [[model, *[_num(row.get(m), row.get("cluster_std") if m == "cluster" else None) for m in metrics]]
            for model, row in results.items()]
    return heads, rows


def main_model(results: dict[str, dict[str, float]]) -> Optional[str]:
    """The model a comparison shows: the student of a distillation run, else the first (only) model."""
    for name in results:
        if name.startswith("student (") or name == "student":
            return name
    return next(iter(results), None)


def comparison(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    cfgs = [key_config(r.config) for r in runs]
    keys = [k for k in cfgs[0] if len({c[k] for c in cfgs}) > 1]
    if "method" not in keys:
        keys.insert(0, "method")
    mains = [(main_model(r.results), r.results) for r in runs]
    metrics: list[str] = []
    for name, res in mains:
        if name is not None:
            metrics += [m for m in _metrics({name: res[name]}) if m not in metrics]
    heads = ["run", *keys, "model", *metrics]
    rows = []
    for run, cfg, (name, res) in zip(runs, cfgs, mains):
        row = res.get(name, {}) if name else {}
        rows.append([run.label, *[cfg[k] for k in keys], name or MISSING,
                     *[_num(row.get(m), row.get("cluster_std") if m == "cluster" else None) for m in metrics]])
    return heads, rows


Block = tuple  # ("h", level, text) | ("p", text) | ("table", heads, rows) | ("img", path, caption)


def build_blocks(runs: list[Run], title: str = "CompReSS report") -> list[Block]:
    blocks: list[Block] = [("h", 1, title)]
    if len(runs) > 1:
        blocks += [("h", 2, "Comparison"),
                   ("p", "Settings that differ between the runs, and each run's main model (the student of a "
                         "distillation) on the held-out split: top-1 (%) of k-NN, cluster alignment (mean ± std over "
                         "k-means seeds) and the linear probe."),
                   ("table", *comparison(runs))]
    for run in runs:
        blocks.append(("h", 2, f"Run `{run.label}`"))
        blocks.append(("p", f"Directory: `{run.path}`"))
        cfg = key_config(run.config)
        if run.config:
            blocks.append(("table", ["setting", "value"], [[k, v] for k, v in cfg.items()]))
        else:
            blocks.append(("p", "No `.hydra/config.yaml` in this directory."))
        if run.overrides:
            blocks.append(("p", "Overrides: " + " ".join(f"`{o}`" for o in run.overrides)))
        if run.results:
            blocks.append(("h", 3, "Results (top-1 %, held-out split)"))
            blocks.append(("table", *results_rows(run.results)))
        else:
            blocks.append(("p", "No `results.json` (evaluation at the end was off, or the run did not finish)."))
        pictures = [(name, p) for name, p in run.images.items()]
        if pictures:
            blocks.append(("h", 3, "Pictures"))
            for name, p in pictures:
                blocks.append(("img", p, KNOWN_IMAGES.get(name, Path(name).stem.replace("_", " "))))
        for w in run.wandb_runs:
            what = "offline W&B run" if w.name.startswith("offline-") else "W&B run"
            tail = f" (upload: `wandb sync {w}`)" if w.name.startswith("offline-") else ""
            blocks.append(("p", f"{what}: `{w.name}`{tail}"))
    return blocks


# ------------------------------------------------------------------------------------------------ rendering
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"-?\d+(\.\d+)?( ± \d+(\.\d+)?)?", str(text)))


def render_markdown(blocks: list[Block], image_ref) -> str:
    """``image_ref(path) -> str``: how the Markdown names a picture (a relative path)."""
    out: list[str] = []
    for b in blocks:
        if b[0] == "h":
            out.append(f"{'#' * b[1]} {b[2]}")
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "table":
            heads, rows = b[1], b[2]
            right = [bool(rows) and all(_is_number(r[i]) or r[i] == MISSING for r in rows) for i in range(len(heads))]
            out.append("| " + " | ".join(_md_cell(h) for h in heads) + " |")
            out.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        elif b[0] == "img":
            out.append(f"![{b[2]}]({image_ref(b[1])})")
        out.append("")
    return "\n".join(out)


def _inline_html(text: str) -> str:
    parts = str(text).split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.6em 0 1.2em}th,td{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}code{background:#f5f5f5;
padding:0 .2em}img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}figcaption{color:#555;font-size:.9em}"""


def render_html(blocks: list[Block], title: str = "CompReSS report") -> str:
    """A self-contained page: every picture embedded as a base64 PNG."""
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(title)}</title>",
           f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{_inline_html(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{_inline_html(b[1])}</p>")
        elif b[0] == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in b[1])
                       + "</tr></thead><tbody>")
            for row in b[2]:
                cells = "".join(f"<td class=\"num\">{html.escape(str(c))}</td>" if _is_number(c)
                                else f"<td>{_inline_html(c)}</td>" for c in row)
                out.append(f"<tr>{cells}</tr>")
            out.append("</tbody></table>")
        elif b[0] == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
            out.append(f"<figure><img alt=\"{html.escape(b[2])}\" src=\"data:image/png;base64,{data}\">"
                       f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ command
def _labels(paths: list[Path]) -> list[str]:
    if len(paths) == 1:
        return [paths[0].name or str(paths[0])]
    resolved = [p.resolve() for p in paths]
    try:
        common = Path(os.path.commonpath(resolved))
    except ValueError:
        common = None
    labels = []
    for p, r in zip(paths, resolved):
        rel = str(r.relative_to(common)) if common is not None and r != common else r.name
        labels.append(rel if rel not in ("", ".") else str(p))
    if common is not None and all(re.fullmatch(r"\d+", lab) for lab in labels):  # multirun jobs 0, 1, ...
        labels = [f"{common.name}/{lab}" for lab in labels]
    return labels


def write_report(run_dirs: list[str | Path], out: Optional[str | Path] = None, html_out: Optional[str | Path] = None,
                 assets: Optional[str | Path] = None, copy: bool = True, title: str = "CompReSS report") -> str:
    """Build the report of ``run_dirs``; write the Markdown to ``out`` (and its pictures to ``assets``) and the
    HTML page to ``html_out`` when given. Returns the Markdown."""
    paths = [Path(p) for p in run_dirs]
    out = Path(out) if out is not None else None
    if out is not None and copy:
        assets = Path(assets) if assets is not None else out.parent / f"{out.stem}_files"
    elif not copy:
        assets = None
    elif assets is not None:
        assets = Path(assets)
    if assets is not None:
        assets.mkdir(parents=True, exist_ok=True)
    runs = [load_run(p, label, curves_dir=assets) for p, label in zip(paths, _labels(paths))]
    blocks = build_blocks(runs, title)
    base = out.parent if out is not None else Path.cwd()

    copied: dict[Path, Path] = {}

    def image_ref(p: Path) -> str:
        p = Path(p)
        if assets is not None and p.resolve().parent != assets.resolve():
            if p not in copied:
                owner = next((r for r in runs if p in r.images.values()), None)
                name = f"{_slug(owner.label)}_{p.name}" if owner is not None and len(runs) > 1 else p.name
                copied[p] = assets / name
                shutil.copyfile(p, copied[p])
            p = copied[p]
        return Path(os.path.relpath(p.resolve(), base.resolve())).as_posix()

    md = render_markdown(blocks, image_ref)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(md)
    if html_out is not None:
        Path(html_out).parent.mkdir(parents=True, exist_ok=True)
        Path(html_out).write_text(render_html(blocks, title))
    return md
