"""The comparison's table: rows aggregated over seeds (mean, std), the best of each column, the claim (does the
CompReSS student beat the other distillations and MoCo from scratch?), the Markdown table and the bar chart."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from .settings import METHOD_LABELS, METRICS


def _row(res: dict) -> dict[str, float]:
    """The trained model's row of a run's results: the first ``student ...`` row, else the first row."""
    return next((v for k, v in res.items() if k.startswith("student (")), next(iter(res.values())))


def _pick(res: dict, prefix: str) -> Optional[dict[str, float]]:
    return next((v for k, v in res.items() if k.startswith(prefix)), None)


def aggregate(rows: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """Per label: each metric's mean and std over the runs (seeds)."""
    out = {}
    for label, runs in rows.items():
        out[label] = {}
        for m in METRICS:
            v = np.array([r[m] for r in runs if m in r], dtype=float)
            if v.size:
                out[label][m] = [float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)]
    return out


# rows that are references, not self-supervised students: never marked best, never in the gap or the ranking
REFERENCE_ROWS = ("raw pixels", "random init", "teacher (MoCo v2)", "supervised")


SCRATCH = METHOD_LABELS["moco_scratch"]


FAMILY_ROWS = (METHOD_LABELS["seed"], METHOD_LABELS["simreg"], METHOD_LABELS["disco"])


TEACHER = "teacher (MoCo v2)"


def best_rows(rows: dict[str, dict]) -> dict[str, set[str]]:
    """Per metric, the self-supervised student row(s) with the highest mean (ties all marked); nothing is marked
    when fewer than two rows compete."""
    out: dict[str, set[str]] = {}
    for m in METRICS:
        cands = {k: r[m][0] for k, r in rows.items() if k not in REFERENCE_ROWS and m in r}
        if len(cands) >= 2:
            top = max(cands.values())
            out[m] = {k for k, v in cands.items() if round(v, 2) == round(top, 2)}
    return out


def claim_check(rows: dict[str, dict]) -> Optional[dict]:
    """The paper's claim on one student, on 1-NN means: each distillation method's share of the scratch-to-teacher
    gap, ``(method - scratch) / (teacher - scratch)``, the methods ranked, and whether CompReSS (its better
    variant) ranks first among them. ``None`` without a teacher and a scratch row."""
    if TEACHER not in rows or SCRATCH not in rows or "1-NN" not in rows[TEACHER] or "1-NN" not in rows[SCRATCH]:
        return None
    teacher, scratch = rows[TEACHER]["1-NN"][0], rows[SCRATCH]["1-NN"][0]
    methods = {k: r["1-NN"][0] for k, r in rows.items()
               if k not in REFERENCE_ROWS and k != SCRATCH and "1-NN" in r}
    if not methods:
        return None
    gap = teacher - scratch
    ranking = sorted(methods, key=lambda k: -methods[k])

    def rank_of_compress(order: list[str]) -> Optional[int]:
        return next((i + 1 for i, k in enumerate(order) if k.startswith("CompReSS")), None)

    # the paper's claim is about its own comparison; the later family (SEED, SimReg, DisCo) postdates it
    paper = [k for k in ranking if k not in FAMILY_ROWS]
    out = {"teacher_1nn": teacher, "scratch_1nn": scratch, "gap_points": gap,
           "gap_closed": {k: (methods[k] - scratch) / gap if gap else float("nan") for k in ranking},
           "ranking": ranking, "compress_rank": rank_of_compress(ranking),
           "compress_first": rank_of_compress(ranking) == 1}
    if len(paper) < len(ranking):
        out.update({"paper_ranking": paper, "paper_compress_rank": rank_of_compress(paper),
                    "paper_compress_first": rank_of_compress(paper) == 1})
    return out


def claim_lines(student: str, c: Optional[dict]) -> list[str]:
    if c is None:
        return [f"{student}: no teacher or no MoCo-from-scratch row; the gap cannot be computed."]
    head = (f"{student}: teacher {c['teacher_1nn']:.2f}, MoCo from scratch {c['scratch_1nn']:.2f} (1-NN; gap "
            f"{c['gap_points']:+.2f} points).")
    if c["gap_points"] <= 0:
        head += " The teacher does not lead the student from scratch: the shares below measure nothing."
    lines = [head, "", "| method | gap closed (1-NN) | rank |", "|---|---:|---:|"]
    for i, k in enumerate(c["ranking"]):
        share = c["gap_closed"][k]
        lines.append(f"| {k} | {f'{100 * share:.0f}%' if math.isfinite(share) else '–'} | {i + 1} |")
    if c["compress_rank"] is None:
        return lines + ["", "No CompReSS row yet: the claim cannot be checked."]
    if "paper_ranking" not in c:
        return lines + ["", _verdict(c["ranking"], c["compress_rank"], "among the distillation methods")]
    return lines + ["", _verdict(c["paper_ranking"], c["paper_compress_rank"],
                                 "among the paper's methods (its baselines and CompReSS)"),
                    "", _verdict(c["ranking"], c["compress_rank"], "with the later family (SEED, SimReg, DisCo)")]


def _verdict(ranking: list[str], rank: int, among: str) -> str:
    if rank == 1:
        return f"CompReSS ranks first {among}" + (", as the paper claims." if "family" not in among else ".")
    return f"CompReSS does not rank first {among}: {ranking[0]} leads; CompReSS's better variant is #{rank} of " \
           f"{len(ranking)}."


def markdown_table(table: dict[str, dict[str, dict]], meta: dict) -> str:
    lines = [f"# CompReSS comparison on {meta['data']} (test split; top-1 %, mean ± std over seeds)", "",
             f"Command: `{meta['command']}`. Teacher: {meta['teacher']}. Students: equal epochs and augmentations "
             f"({meta['student_args']}). Seeds: {meta['seeds']}. Final-epoch numbers only; cluster alignment is "
             f"itself a mean over k-means seeds within each run.", ""]
    if meta.get("notes"):
        lines += [meta["notes"], ""]
    if meta.get("progress"):
        lines += [f"Progress: {meta['progress']}.", ""]
    if meta.get("precision"):
        lines += [f"Precision: {meta['precision']}.", ""]
    for student, rows in table.items():
        best = best_rows(rows)
        lines += [f"## {student}", "", "| model | 1-NN | 20-NN | cluster alignment | linear | runs |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, r in rows.items():
            cells = []
            for m in METRICS:
                cell = f"{r[m][0]:.2f} ± {r[m][1]:.2f}" if m in r else "–"
                cells.append(f"**{cell}**" if label in best.get(m, ()) else cell)
            n = max((r[m][2] for m in METRICS if m in r), default=0)
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {n} |")
        lines.append("")
        clf = rows.get("supervised", {}).get("classifier")
        if clf:
            lines += [f"Supervised reference, its own classifier on the test split: top-1 {clf[0]:.2f} ± {clf[1]:.2f} "
                      f"({clf[2]} runs).", ""]
        if best:
            lines += ["Bold: the best self-supervised student in the column (raw pixels, random init, teacher and "
                      "supervised are references).", ""]
    claims = {s: claim_check(rows) for s, rows in table.items()}
    if any(c is not None for c in claims.values()):
        lines += ["## The claim: share of the scratch-to-teacher gap closed (1-NN means)", ""]
        for student, c in claims.items():
            lines += claim_lines(student, c) + [""]
    return "\n".join(lines)


def bar_chart(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4), squeeze=False)
    for ax, (student, rows) in zip(axes[0], table.items()):
        labels = [k for k in rows if "1-NN" in rows[k]]
        ax.set_title(student)
        if not labels:  # no run of this student has finished yet
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
            continue
        means = [rows[k]["1-NN"][0] for k in labels]
        stds = [rows[k]["1-NN"][1] for k in labels]
        ax.bar(range(len(labels)), means, yerr=stds, color="tab:blue", capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
        lo = min(means) - 3
        ax.set_ylim(max(0, lo), min(100, max(means) + 2))
        ax.set_ylabel("1-NN top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
