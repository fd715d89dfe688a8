"""Is the reproduction's teacher worth compressing? Its bars, measured and printed (``reproduce`` part of Table 1).

A teacher is only worth compressing if it knows more than the input does: on Fashion-MNIST cosine 1-NN on raw
pixels is strong. ``run_teacher_check`` scores the teacher and the raw pixels side by side with
``compress_lit.evaluate`` (by default on the whole train split as k-NN bank, k-means and probe set: the protocol
the teacher was built and judged on); ``teacher_bars`` then states each bar of :class:`TeacherBars` on that probe
and, where the table has the rows, on the table's own protocol (its smaller bank), so that a bar cleared on one
probe and missed on the other is visible, not hidden.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

PIXELS = "raw pixels"


def evaluate_row(res: dict) -> dict[str, float]:
    """A ``compress_lit.evaluate`` results.json as a table row (the keys of the student runs' rows)."""
    row: dict[str, float] = {}
    for key, v in res.get("knn", {}).items():
        top, k = key.split("_k")
        if top == "top1":
            row[f"{k}-NN"] = float(v)
    if "cluster" in res:
        row["cluster"], row["cluster_std"] = float(res["cluster"]["acc_mean"]), float(res["cluster"]["acc_std"])
    if "linear" in res:
        row["linear"] = float(res["linear"]["top1"])
    return row


def run_teacher_check(args: list[str], teacher_ckpt: Path, sha256: str, out: Path, run_step: Callable,
                      dry: bool = False, run: bool = True, teacher_args: tuple[str, ...] = ()) -> Optional[dict]:
    """Score the teacher (``checkpoint=teacher_ckpt``) and the raw pixels (``model_format=pixels``) with the same
    ``args``. The runs live in ``out/teacher/check-<sha256[:12]>`` (the teacher's weights hash): a different
    teacher gets its own check.
    ``teacher_args``: how the teacher's file is read (``model_format=<format> model.arch=...``; none: as a
    compress_lit training checkpoint). ``run=False``: only read finished runs. Returns ``{"args", "num_train", "num_val", "teacher": row,
    "raw pixels": row}`` (``None`` on a dry run or when a run is missing)."""
    runs = out / "teacher" / f"check-{sha256[:12]}"
    rows, sizes = {}, {}
    for name, extra in (("teacher", [f"checkpoint={teacher_ckpt}", *teacher_args]), (PIXELS, ["model_format=pixels"])):
        _, res = run_step("compress_lit.evaluate", [*extra, *args], runs, f"check-{name.replace(' ', '_')}", dry,
                          run=run)
        if res is None:
            return None
        rows[name] = evaluate_row(res)
        sizes = {"num_train": res.get("num_train"), "num_val": res.get("num_val")}
    return {"args": list(args), **sizes, **rows}


def _bar(name: str, need: float, check: Optional[float], table: Optional[float]) -> dict:
    return {"bar": name, "need": need, "check": check, "table": table,
            "check_ok": None if check is None else bool(check >= need - 1e-9),
            "table_ok": None if table is None else bool(table >= need - 1e-9)}


def teacher_bars(check: Optional[dict], table: dict[str, dict], bars, teacher_label: str,
                 scratch_label: str) -> list[dict]:
    """Every bar with its value on the check's probe (``check``) and on the table's protocol (``table``; the
    table's rows hold ``[mean, std, n]``). The scratch bar exists per student and only on the table's protocol."""
    def diff(a: Optional[dict], b: Optional[dict], m: str) -> Optional[float]:
        return None if a is None or b is None or m not in a or m not in b else float(a[m] - b[m])

    def mean(rows: dict, label: str) -> Optional[dict]:
        return {m: v[0] for m, v in rows[label].items()} if label in rows else None

    t, p = (check or {}).get("teacher"), (check or {}).get(PIXELS)
    first = next(iter(table.values()), {})  # the teacher and pixel rows are the same for every student
    tt, tp = mean(first, teacher_label), mean(first, PIXELS)
    out = [_bar("linear: teacher - raw pixels", float(bars.linear_over_pixels), diff(t, p, "linear"),
                diff(tt, tp, "linear")),
           _bar("1-NN: teacher - raw pixels", -float(bars.knn_below_pixels), diff(t, p, "1-NN"), diff(tt, tp, "1-NN"))]
    for student, rows in table.items():
        out.append(_bar(f"1-NN: teacher - MoCo from scratch ({student})", float(bars.knn_over_scratch), None,
                        diff(mean(rows, teacher_label), mean(rows, scratch_label), "1-NN")))
    return out


def bars_lines(check: Optional[dict], bars: list[dict], table_probe: str) -> list[str]:
    """The markdown section: the two probes' rows of the teacher and the pixels, then each bar on each probe."""
    def cell(v: Optional[float], ok: Optional[bool]) -> str:
        return "–" if v is None else f"{v:+.2f} ({'cleared' if ok else 'missed'})"

    probe = (f"all {check['num_train']} train images as bank and probe set, {check['num_val']} test images"
             if check and check.get("num_train") else "the check's probe")
    lines = ["## The teacher's bars", ""]
    if check:
        lines += [f"Teacher check (`compress_lit.evaluate {' '.join(check['args'])}`; {probe}):", "",
                  "| model | 1-NN | 20-NN | cluster alignment | linear |", "|---|---:|---:|---:|---:|"]
        for name in ("teacher", PIXELS):
            r = check[name]
            lines.append(f"| {name} | " + " | ".join(f"{r[m]:.2f}" if m in r else "–"
                                                     for m in ("1-NN", "20-NN", "cluster", "linear")) + " |")
        lines.append("")
    lines += [f"| bar (points of top-1) | needed | teacher check | table protocol ({table_probe}) |",
              "|---|---:|---:|---:|"]
    for b in bars:
        lines.append(f"| {b['bar']} | ≥ {b['need']:+.1f} | "
                     f"{cell(b['check'], b['check_ok'])} | {cell(b['table'], b['table_ok'])} |")
    return lines


__all__ = ["PIXELS", "bars_lines", "evaluate_row", "run_teacher_check", "teacher_bars"]
