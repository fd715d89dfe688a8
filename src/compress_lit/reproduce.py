"""`python -m compress_lit.reproduce` (`make reproduce`): the paper's comparison on Fashion-MNIST.

1. Pretrain a MoCo v2 teacher (`compress_lit.pretrain`), 2. train every method on each small student with the same
epochs and augmentations (`compress_lit.train`; "MoCo from scratch" is `compress_lit.pretrain` on the student),
3. evaluate every model with the evaluation suite (1-NN, 20-NN, cluster alignment over k-means seeds, linear probe
on features) on the test split, 4. write ``<out_dir>/table1_<data>.md`` and ``.json`` in the paper's layout (mean ±
std over seeds, final-epoch numbers only) and a bar chart PNG.

Every step is a separate run in ``<out_dir>/runs/<step>-<hash>`` whose hash covers its full command line; a step
whose run already has its ``results.json`` is reused, so an interrupted reproduction continues where it stopped.
Presets: ``reproduce_preset=full`` (the committed table) and ``reproduce_preset=quick`` (a smoke run).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from .runtime.precision import PRECISIONS, args_precision, bf16_slowdown_warning, command_precision
from .reproduction.records import recorded_precision, restore_progress, save_progress
from .runtime.safety import load_torch_file
from .runtime.startup import USER_ERRORS, check_mandatory, entry_main, run_entry
from .reproduction.teacher_check import bars_lines, run_teacher_check, teacher_bars

METRICS = ("1-NN", "20-NN", "cluster", "linear")
METHOD_LABELS = {"moco_scratch": "MoCo from scratch", "supervised": "supervised", "regression": "Regression",
                 "regression_bn": "Regression-BN", "crd": "CRD", "cc": "CC", "compress_2q": "CompReSS-2q",
                 "compress_1q": "CompReSS-1q", "compress_2q_nomomentum": "CompReSS-2q (no momentum)",
                 # the later self-supervised distillation methods (docs/family.md)
                 "seed": "SEED", "simreg": "SimReg", "disco": "DisCo"}


@dataclass
class AblationConfig:
    """``ablation.enabled=true``: after the table, the temperature and queue-size ablations of ``method`` on
    ``student`` (each value varied with the other at its centre)."""
    enabled: bool = False
    student: str = "alexnet_small"
    method: str = "compress_2q"
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    temperature: float = 0.04  # the centre: the main table's setting
    queue_size: int = 4096
    temperatures: list[float] = field(default_factory=lambda: [0.02, 0.04, 0.07, 0.1])
    queue_sizes: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])


@dataclass
class TeacherBars:
    """What a teacher worth compressing must show (points of top-1): a linear-probe lead over raw pixels, a 1-NN no
    further below raw pixels than ``knn_below_pixels``, and a 1-NN lead over MoCo from scratch on each student."""
    linear_over_pixels: float = 4.0
    knn_below_pixels: float = 1.0
    knn_over_scratch: float = 3.0


@dataclass
class TeacherCheckConfig:
    """``enabled``: the teacher and the raw pixels are scored side by side by ``compress_lit.evaluate`` with
    ``args`` (by default on the whole train split: the protocol the teacher was built and judged on), and the
    table states each bar on that probe and on the table's own protocol."""
    enabled: bool = False
    args: list[str] = field(default_factory=list)  # compress_lit.evaluate overrides shared by both runs
    bars: TeacherBars = field(default_factory=TeacherBars)


@dataclass
class CandidateConfig:
    """One setting tried by the calibration (``reproduce_preset=calibrate``): ``overrides`` on top of the preset's
    arguments for ``method`` on ``student``; the candidates of one ``group`` compete on ``metric``. ``within`` > 0
    makes the group a convergence search: the first-listed candidate (list them cheapest first) scoring within
    ``within`` points of the group's best is chosen, not the best itself (more epochs that add less than that are
    not worth their cost). Every candidate of a group gives the same ``metric`` and ``within``."""
    group: str = MISSING
    label: str = MISSING
    method: str = MISSING
    student: str = "alexnet_small"
    overrides: list[str] = field(default_factory=list)
    metric: str = "1-NN"
    within: float = 0.0


@dataclass
class ReproduceConfig:
    name: str = MISSING  # preset name, used in the output file names
    out_dir: str = "results"
    data_name: str = "fashion_mnist"
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    students: list[str] = field(default_factory=lambda: ["alexnet_small", "resnet18_small"])
    methods: list[str] = field(default_factory=lambda: list(METHOD_LABELS)[:8])
    # the later family (SEED, SimReg, DisCo): rows of the same table, run by `part=family` (`make reproduce-family`)
    family_methods: list[str] = field(default_factory=list)
    # main: the teacher and `methods`; family: `family_methods` (the main rows are read from their finished runs,
    # never run); all: both; teacher: only build (or check) the teacher (`make reproduce-teacher`); table: run
    # nothing, write the table from the runs finished so far (an interrupted reproduction's progress); record: run
    # and write nothing, only record the finished runs into `progress` (after a run was stopped by force)
    part: str = "all"
    # which preset's teacher to use (default: this preset's own, results/teacher/<name>_teacher.ckpt)
    teacher_name: Optional[str] = None
    teacher_args: list[str] = field(default_factory=list)  # compress_lit.pretrain overrides for the teacher
    teacher_overrides: list[str] = field(default_factory=list)  # compress_lit.train overrides that describe it
    common_args: list[str] = field(default_factory=list)  # every student run (data, epochs, eval)
    scratch_args: list[str] = field(default_factory=list)  # MoCo-from-scratch runs only
    train_args: list[str] = field(default_factory=list)  # distillation / supervised runs only
    # per method: overrides of that method's runs only (a calibrated temperature must not reach SEED's teacher)
    method_args: dict[str, list[str]] = field(default_factory=dict)
    # methods that run the teacher at every step read it from the K-view feature cache instead (teachers/cache.py):
    # the cache is built once (by the first such run, alone) and shared by every student, seed and method
    cached_methods: list[str] = field(default_factory=list)
    cache_args: list[str] = field(default_factory=list)  # the teacher.cached=... overrides for those runs
    # student runs at once; each gets cpu_count // jobs threads (two one-thread runs use 2 cores better than one
    # two-thread run for these small networks)
    jobs: int = 1
    ablation: AblationConfig = field(default_factory=AblationConfig)
    teacher_check: TeacherCheckConfig = field(default_factory=TeacherCheckConfig)
    candidates: list[CandidateConfig] = field(default_factory=list)  # non-empty: a calibration (validation split)
    dry_run: bool = False  # print the commands only
    # a tracked file of the finished runs' records (run_records.py): read back as finished runs before running,
    # written after; lets a reproduction longer than one machine's life continue elsewhere. null: runs/ only
    progress: Optional[str] = None
    # every student run's trainer.precision (null: the preset's, in common_args). `auto` is resolved for this
    # machine in each run's command line (precision.py), so a run's key and record name the precision it ran in
    precision: Optional[str] = None
    # false: no run evaluates the reference rows (random init, teacher, raw pixels): a partial rerun of some rows
    # whose commands then equal the table's own but for what it changes (reproduce_preset=fp32)
    references: bool = True


ConfigStore.instance().store(name="reproduce_schema", node=ReproduceConfig)


class StepFailed(RuntimeError):
    """A step's command failed; its own one-line error (or traceback) is printed above this one."""


def _hash(args: list[str]) -> str:
    return hashlib.sha1("\0".join(args).encode()).hexdigest()[:10]


def step_key(module: str, args: list[str], teacher: str = "") -> str:
    """A run's identity: its command line and, for a run that reads the teacher (every ``compress_lit.train`` step;
    MoCo from scratch does not), the teacher's weights hash (``teacher``). The command names the teacher only by
    its path, so without the hash a rebuilt, different teacher at the same path would silently reuse runs
    distilled from the old one."""
    reads = teacher and module == "compress_lit.train"
    return _hash([module, *args, *([f"teacher weights sha256={teacher}"] if reads else [])])


def _find_done(runs: Path, tag: str, key: str) -> Path:
    done = runs / f"{tag}-{key}" / "results.json"
    if not done.exists():  # the same command under another tag (the ablation's centre is a table run)
        done = next(iter(sorted(runs.glob(f"*-{key}/results.json"))), done)
    return done


def _run_step(module: str, args: list[str], runs: Path, tag: str, dry: bool, threads: Optional[int] = None,
              log_file: bool = False, run: bool = True, teacher: str = "") -> tuple[Path, dict | None]:
    """Run (or reuse) one step. ``threads``: its torch / OpenMP threads; ``log_file``: its output goes to
    ``<run dir>/step.log`` (parallel steps) and only this command's own lines are printed; ``run=False``: reuse a
    finished run or return ``None`` (the rows of another part); ``teacher``: the weights hash of the teacher the
    step reads (part of its identity, :func:`step_key`)."""
    key = step_key(module, args, teacher)
    done = _find_done(runs, tag, key)
    run_dir = done.parent
    if done.exists():
        print(f"[reproduce] {tag}: reusing {run_dir}", flush=True)
        return run_dir, json.loads(done.read_text())
    if not run:
        print(f"[reproduce] {tag}: no finished run (another part runs it); row left out", flush=True)
        return run_dir, None
    cmd = [sys.executable, "-m", module, *args, f"hydra.run.dir={run_dir}"]
    print(f"[reproduce] {tag}: {' '.join(cmd[1:])}", flush=True)
    if dry:
        return run_dir, None
    env = None
    if threads:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    if log_file:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "step.log", "w") as log:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = (run_dir / "step.log").read_text(errors="replace").strip().splitlines()[-5:]
            print("\n".join(f"[reproduce] {tag} | {line}" for line in tail), flush=True)
    else:
        rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        where = f"; its log: {run_dir / 'step.log'}" if log_file else "; its message is above"
        raise StepFailed(f"step {tag} failed (exit status {rc}{where}): python -m {module} {' '.join(args)}")
    seconds = time.time() - t0
    if module == "compress_lit.train" and "method=supervised" in args:
        keep_classifier_accuracy(run_dir)  # while its checkpoint is here: a progress record carries it elsewhere
    precision = args_precision(args)  # the command's, resolved (step_command): what the run ran in
    (run_dir / "step.json").write_text(json.dumps({"seconds": round(seconds, 1), "threads": threads,
                                                   "command": " ".join(["python", "-m", module, *args]),
                                                   **({"precision": precision} if precision else {})}))
    print(f"[reproduce] {tag}: done in {seconds:.0f} s", flush=True)
    return run_dir, json.loads(done.read_text())


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


def step_command(cfg: DictConfig, student: str, method: str, seed: int, teacher_ckpt: Path,
                 extra: tuple[str, ...] = (), references: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """The module and overrides of one student run; ``extra`` overrides come last (the ablations' changes). Its
    ``trainer.precision`` is ``precision`` when set, and ``auto`` is resolved (:func:`command_precision`).
    ``references``: the reference rows this run evaluates beside its student, any of ``random`` (the random-init
    student), ``teacher`` and ``pixels`` (raw pixels); the table takes them from the supervised runs."""
    if method == "moco_scratch":  # MoCo v2 from scratch on the student: the pretraining entry point
        args = [f"student={student}", f"seed={seed}", *cfg.common_args, *cfg.scratch_args,
                *cfg.method_args.get(method, []), *extra]
        return "compress_lit.pretrain", command_precision(args, cfg.precision)[0]
    args = [*cfg.teacher_overrides, f"teacher.checkpoint={teacher_ckpt}", "teacher.pretrain_if_missing=false",
            f"student={student}", f"method={method}", f"seed={seed}", *cfg.common_args, *cfg.train_args,
            *cfg.method_args.get(method, []),
            f"eval.include_teacher={str('teacher' in references).lower()}",
            f"eval.random_baseline={str('random' in references).lower()}"]
    if "pixels" in references:
        args.append("eval.pixel_baseline=true")
    if method in cfg.cached_methods:
        args += list(cfg.cache_args)
    # trainer.precision=auto resolved for this machine: the run's key and record name what it ran in
    return "compress_lit.train", command_precision([*args, *extra], cfg.precision)[0]


def ablation_points(ab: DictConfig) -> list[tuple[str, dict[str, float]]]:
    """The ablation's settings: the centre, then each temperature and each queue size with the other at its centre
    value. Each point's overrides name only what differs from the centre, so the centre point is the main table's
    run (same command line, reused)."""
    centre = {"temperature": float(ab.temperature), "queue_size": int(ab.queue_size)}
    points = [("centre", {})]
    for t in ab.temperatures:
        if float(t) != centre["temperature"]:
            points.append(("temperature", {"temperature": float(t)}))
    for q in ab.queue_sizes:
        if int(q) != centre["queue_size"]:
            points.append(("queue_size", {"queue_size": int(q)}))
    return points


def run_ablation(cfg: DictConfig, runs: Path, teacher_ckpt: Path, out: Path, teacher: str = "") -> dict:
    """Temperature and queue-size ablations of one method on one student (docs/paper.md, ablations), written to
    ``<out_dir>/ablation_<data>.md`` / ``.json``: rows ``T=...`` (queue at its centre) and ``queue=...`` (T at its
    centre), mean ± std over the seeds."""
    ab = cfg.ablation
    centre = {"temperature": float(ab.temperature), "queue_size": int(ab.queue_size)}
    rows: dict[str, dict[str, list]] = {"temperature": {}, "queue_size": {}}
    for kind, change in ablation_points(ab):
        setting = {**centre, **change}
        extra = tuple(f"method.{k}={v}" for k, v in change.items())
        results = []
        for seed in ab.seeds:
            module, args = step_command(cfg, ab.student, ab.method, seed, teacher_ckpt, extra)
            tag = f"ablation-{ab.student}-{ab.method}-" + "-".join(f"{k}{v}" for k, v in setting.items()) + f"-s{seed}"
            _, res = _run_step(module, args, runs, tag, cfg.dry_run, teacher=teacher)
            if res:
                results.append(_row(res))
        for k in ("temperature", "queue_size") if kind == "centre" else (kind,):
            label = f"T={setting['temperature']:g}" if k == "temperature" else f"queue={setting['queue_size']}"
            rows[k][label] = results
    if cfg.dry_run:
        return {}
    table = {f"{METHOD_LABELS.get(ab.method, ab.method)} on {ab.student}: temperature (queue {centre['queue_size']})":
             aggregate(dict(sorted(rows["temperature"].items(), key=lambda kv: float(kv[0][2:])))),
             f"{METHOD_LABELS.get(ab.method, ab.method)} on {ab.student}: queue size (T {centre['temperature']:g})":
             aggregate(dict(sorted(rows["queue_size"].items(), key=lambda kv: int(kv[0][6:]))))}
    meta = {"data": cfg.data_name,
            "command": f"python -m compress_lit.reproduce reproduce_preset={cfg.name} ablation.enabled=true",
            "teacher": " ".join(cfg.teacher_args),
            "student_args": " ".join(command_precision(list(cfg.common_args), cfg.precision)[0]),
            "seeds": list(ab.seeds)}
    stem = out / f"ablation_{cfg.data_name}" if cfg.name == "full" else out / f"ablation_{cfg.data_name}_{cfg.name}"
    md = markdown_table(table, meta).replace("# CompReSS comparison", "# CompReSS ablations", 1)
    Path(f"{stem}.md").write_text(md + "\n")
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "table": table}, indent=2))
    print(md, flush=True)
    return table


PARTS = ("all", "main", "family", "teacher", "table", "record")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def teacher_tensors(obj) -> dict:
    """The tensors a checkpoint's teacher is: the ``backbone.*`` entries of a pretraining checkpoint's
    ``state_dict`` (what the compress_lit teacher format loads; its momentum copy, projector, queue and optimizer
    state are training state), else every entry of it (or of a bare state dict)."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    backbone = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    return backbone or dict(sd)


def release_teacher(ckpt: Path) -> None:
    """Rewrite a freshly pretrained teacher in its release form, in place and atomically: ``{'state_dict':
    backbone.* tensors, 'epoch', 'global_step'}``, about a quarter of the Lightning checkpoint (the full one stays
    in the teacher's run directory). Its weights hash does not change (:func:`teacher_tensors`)."""
    import torch

    obj = load_torch_file(ckpt, "the teacher checkpoint")  # weights only, as every file is read
    release = {"state_dict": teacher_tensors(obj), **{k: obj[k] for k in ("epoch", "global_step") if k in obj}}
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    torch.save(release, tmp)
    os.replace(tmp, ckpt)


def weights_sha256(ckpt: Path) -> str:
    """SHA-256 of a checkpoint's teacher weights alone (:func:`teacher_tensors`), each tensor in key order with its
    name, dtype and shape. The file's own SHA-256 also covers what Lightning stores beside the weights (the run
    directory's absolute path among them), so the same teacher rebuilt in another checkout, or released
    (:func:`release_teacher`), has another file hash but this same weights hash."""
    import torch

    sd = teacher_tensors(load_torch_file(ckpt, "the teacher checkpoint"))  # weights only: a swapped file runs nothing
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k]
        if torch.is_tensor(t):
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{k}\0{t.dtype}\0{tuple(sd[k].shape)}\0".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_weights(cfg: DictConfig, out: Path) -> str:
    """The weights hash of the preset's teacher: from its manifest, or computed from the checkpoint for a manifest
    written before the hash was recorded; empty when neither exists (a dry run)."""
    ckpt, manifest = teacher_files(cfg, out)
    m = json.loads(manifest.read_text()) if manifest.exists() else {}
    if m.get("weights_sha256"):
        return m["weights_sha256"]
    return weights_sha256(ckpt) if ckpt.exists() else ""


def teacher_files(cfg: DictConfig, out: Path) -> tuple[Path, Path]:
    """The teacher checkpoint and its manifest (``<name>_teacher.json``: the command's hash, the file's SHA-256,
    the teacher's own evaluation and build time). Relative paths: run hashes stay checkout-independent."""
    name = cfg.teacher_name or cfg.name
    return out / "teacher" / f"{name}_teacher.ckpt", out / "teacher" / f"{name}_teacher.json"


def ensure_teacher(cfg: DictConfig, out: Path) -> tuple[Path, dict | None]:
    """Reuse the teacher when its checkpoint matches the SHA-256 its manifest recorded (and, for the preset's own
    teacher, the manifest's command is this preset's); build it when it is missing; refuse a file whose hash
    differs (a teacher replaced by hand would silently change every row)."""
    ckpt, manifest = teacher_files(cfg, out)
    t_args = [*cfg.teacher_args, f"output={ckpt}"]
    key = _hash(["compress_lit.pretrain", *t_args])
    borrowed = bool(cfg.teacher_name) and cfg.teacher_name != cfg.name
    if cfg.dry_run:
        built = f"the {cfg.teacher_name} preset's" if borrowed else f"python -m compress_lit.pretrain {' '.join(t_args)}"
        print(f"[reproduce] teacher: {ckpt} ({built})", flush=True)
        return ckpt, None
    if manifest.exists() and ckpt.exists():
        m = json.loads(manifest.read_text())
        if borrowed or m.get("key") == key:
            got = _sha256(ckpt)
            if got != m.get("sha256"):
                raise StepFailed(f"teacher checkpoint {ckpt} does not match the SHA-256 recorded in {manifest} "
                                 f"({got[:12]}... vs {str(m.get('sha256'))[:12]}...): delete both files to rebuild "
                                 f"it (make reproduce-teacher)")
            print(f"[reproduce] teacher: reusing {ckpt} (SHA-256 {got[:12]}... as recorded)", flush=True)
            return ckpt, m.get("results")
    if borrowed:
        raise StepFailed(f"the {cfg.teacher_name} preset's teacher {ckpt} (with {manifest}) is not built: run "
                         f"make reproduce-teacher first")
    t0 = time.time()
    run_dir, res = _run_step("compress_lit.pretrain", t_args, out / "teacher", "teacher", False)
    if not ckpt.exists():  # the teacher's run was reused but its copy is gone: take it from the run's checkpoints
        from .runtime.safety import atomic_copy

        atomic_copy(run_dir / "checkpoints" / "last.ckpt", ckpt)
    release_teacher(ckpt)
    record = {"key": key, "command": f"python -m compress_lit.pretrain {' '.join(t_args)}",
              "sha256": _sha256(ckpt), "weights_sha256": weights_sha256(ckpt), "bytes": ckpt.stat().st_size,
              "release": "the backbone's weights only (reproduce.release_teacher); the full Lightning checkpoint "
                         "is the run's checkpoints/last.ckpt",
              "results": res,
              "seconds_this_call": round(time.time() - t0, 1)}
    from .runtime.safety import atomic_write_bytes

    atomic_write_bytes(manifest, (json.dumps(record, indent=2) + "\n").encode())
    print(f"[reproduce] teacher: {ckpt} built, SHA-256 {record['sha256'][:12]}... recorded in {manifest}",
          flush=True)
    return ckpt, res


def teacher_check(cfg: DictConfig, out: Path, teacher_ckpt: Path) -> Optional[dict]:
    """The teacher and the raw pixels scored side by side (teacher_check.py); ``None`` when the preset does not ask
    for it. ``part=table`` only reads finished check runs."""
    if not cfg.teacher_check.enabled:
        return None
    _, manifest = teacher_files(cfg, out)
    m = json.loads(manifest.read_text()) if manifest.exists() else {}
    sha = m.get("weights_sha256") or m.get("sha256", "")  # the weights: the same teacher rebuilt elsewhere reuses it
    return run_teacher_check(list(cfg.teacher_check.args), teacher_ckpt, sha or "unbuilt", out, _run_step,
                             dry=cfg.dry_run, run=cfg.part != "table")


def table_probe(cfg: DictConfig) -> str:
    """The table's k-NN bank / probe set in words, from ``common_args``."""
    n = next((a.split("=", 1)[1] for a in cfg.common_args if a.startswith("data.train_subset=")), None)
    if "data.eval_full_train=true" in cfg.common_args:
        return "the whole train split as bank and probe set" + (f"; students train on {int(n):,} of its images"
                                                                if n and n != "null" else "")
    return f"{int(n):,}-image bank and probe set" if n and n != "null" else "the whole train split"


@dataclass
class Step:
    tag: str
    module: str
    args: list[str]
    run: bool  # False: another part's step, only read when finished
    student: str = ""
    method: str = ""
    seed: int = 0
    references: tuple[str, ...] = ()
    teacher: str = ""  # the teacher's weights hash (step_key: part of the identity of a step that reads it)


def plan_steps(cfg: DictConfig, teacher_ckpt: Path, teacher: str = "") -> list[Step]:
    """Every student run of the table, in table order. The supervised runs (or, without them, the first
    distillation method's) also evaluate the reference rows: the random-init student on every seed, the teacher
    and the raw pixels on the first seed (they do not depend on the seed). ``teacher``: the teacher's weights
    hash, part of the identity of every step that reads it."""
    run_main = cfg.part in ("all", "main")
    run_family = cfg.part in ("all", "family")
    methods = [*cfg.methods, *[m for m in cfg.family_methods if m not in cfg.methods]]
    ref_method = "supervised" if "supervised" in methods else next((m for m in methods if m != "moco_scratch"), None)
    ref_method = ref_method if cfg.references else None
    steps = []
    for student in cfg.students:
        for method in methods:
            runs = run_family if (method in cfg.family_methods and method not in cfg.methods) else run_main
            for i, seed in enumerate(cfg.seeds):
                refs: tuple[str, ...] = ()
                if method == ref_method:
                    refs = ("random", "teacher", "pixels") if i == 0 else ("random",)
                module, args = step_command(cfg, student, method, seed, teacher_ckpt, references=refs)
                steps.append(Step(f"{student}-{method}-s{seed}", module, args, runs, student, method, seed, refs,
                                  teacher))
    return steps


def build_teacher_cache(step: Step, runs: Path) -> None:
    """The teacher's feature cache that ``step`` reads, built (or found complete) by ``compress_lit.cache_features``
    with the step's own command line and every thread, before the parallel runs start. Every run that reads it then
    trains with the pool's thread count, so no run's numbers depend on whether it happened to build the cache
    (a different thread count sums in a different order). Its log: ``<runs>/teacher-cache-<key>/step.log``."""
    key = step_key(step.module, step.args, step.teacher)
    log_dir = runs / f"teacher-cache-{key}"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "compress_lit.cache_features", *step.args, f"hydra.run.dir={log_dir}"]
    print(f"[reproduce] teacher cache (for {step.tag} and the others that read it): {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    with open(log_dir / "step.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = (log_dir / "step.log").read_text(errors="replace").strip().splitlines()[-5:]
        print("\n".join(f"[reproduce] teacher cache | {line}" for line in tail), flush=True)
        raise StepFailed(f"building the teacher cache failed (exit status {rc}; its log: {log_dir / 'step.log'})")
    print(f"[reproduce] teacher cache: done in {time.time() - t0:.0f} s", flush=True)


def execute(cfg: DictConfig, steps: list[Step], runs: Path) -> list[dict | None]:
    """Run the steps (``jobs`` at a time, one thread each); the teacher cache the cached methods read is built
    first, alone with every thread (:func:`build_teacher_cache`), so that parallel steps never build it twice."""
    results: list[dict | None] = [None] * len(steps)
    jobs = max(1, int(cfg.jobs))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    todo = []
    first: dict[str, int] = {}  # the same command twice (a calibration's centre in several groups) runs once
    for i, st in enumerate(steps):
        key = step_key(st.module, st.args, st.teacher)
        if key in first:
            continue
        first[key] = i
        done = _find_done(runs, st.tag, key)
        if done.exists() or not st.run or cfg.dry_run or jobs == 1:
            results[i] = _run_step(st.module, st.args, runs, st.tag, cfg.dry_run, run=st.run, teacher=st.teacher)[1]
        else:
            todo.append(i)
    first_cached = next((i for i in todo if steps[i].method in cfg.cached_methods), None)
    if first_cached is not None:
        build_teacher_cache(steps[first_cached], runs)
    if todo:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {i: pool.submit(_run_step, steps[i].module, steps[i].args, runs, steps[i].tag, False,
                                      threads, True, teacher=steps[i].teacher) for i in todo}
            failed = None
            for i, fut in futures.items():
                try:
                    results[i] = fut.result()[1]
                except StepFailed as e:  # let the others finish (their runs are reused next time), then report
                    failed = failed or e
            if failed:
                raise failed
    for i, st in enumerate(steps):
        j = first[step_key(st.module, st.args, st.teacher)]
        if j != i:
            results[i] = results[j]
    return results


def execute_recorded(cfg: DictConfig, steps: list[Step], runs: Path) -> list[dict | None]:
    """:func:`execute`, with ``progress=<file>``: its records restored as finished runs first, and every finished
    run recorded afterwards, also when a step failed or the call was interrupted."""
    if not cfg.progress or cfg.dry_run:
        return execute(cfg, steps, runs)
    restored = restore_progress(Path(cfg.progress), runs)
    print(f"[reproduce] progress={cfg.progress}: {restored} finished runs restored", flush=True)
    try:
        return execute(cfg, steps, runs)
    finally:
        n = save_progress(runs, Path(cfg.progress))
        print(f"[reproduce] progress={cfg.progress}: {n} finished runs recorded", flush=True)


def announce_precision(cfg: DictConfig) -> list[str]:
    """``common_args`` as every student run gets them (``precision`` applied, ``auto`` resolved for this machine),
    after saying once which precision that is and why, and warning where an explicit bf16 would be emulated. A
    ``precision`` Lightning does not know is a ``ConfigError`` naming it."""
    from .runtime.config import ConfigError

    if cfg.precision is not None and str(cfg.precision) not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r} is invalid: choose one of {list(PRECISIONS)}")
    args, choice = command_precision(list(cfg.common_args), cfg.precision)
    if choice is not None:
        print(f"[reproduce] precision of every student run: {choice.line()}", flush=True)
        warning = bf16_slowdown_warning(choice)
        if warning:
            print(f"[reproduce] warning: {warning}", flush=True)
    return args


def precision_note(steps: list[Step], results: list[dict | None], runs: Path) -> str:
    """The precision the finished runs ran in, as their records state (``run_records.recorded_precision``):
    ``bf16-mixed (all 66 runs)``, or each precision with its number of runs."""
    counts: dict[str, int] = {}
    seen = set()
    for st, res in zip(steps, results):
        key = step_key(st.module, st.args, st.teacher)
        if res is None or key in seen:
            continue
        seen.add(key)
        p = recorded_precision(_find_done(runs, st.tag, key).parent) or "not recorded"
        counts[p] = counts.get(p, 0) + 1
    if len(counts) == 1:
        p, n = next(iter(counts.items()))
        return f"{p} ({'all ' if n > 1 else ''}{n} run{'s' if n > 1 else ''}, as each run's record states)"
    return "; ".join(f"{p}: {n} runs" for p, n in sorted(counts.items())) + " (as each run's record states)"


def table_rows(cfg: DictConfig, steps: list[Step], results: list[dict | None]) -> dict[str, dict]:
    """Per student: the reference rows (raw pixels, random init, teacher, supervised) then every method."""
    table: dict[str, dict] = {}
    for student in cfg.students:
        rows: dict[str, list] = {"raw pixels": [], "random init": [], TEACHER: []}
        for st, res in zip(steps, results):
            if st.student != student or res is None:
                continue
            label = METHOD_LABELS.get(st.method, st.method)
            rows.setdefault(label, []).append(_row(res))
            for ref, prefix, name in (("pixels", "raw pixels", "raw pixels"),
                                      ("random", "student, random init", "random init"),
                                      ("teacher", "teacher (", TEACHER)):
                row = _pick(res, prefix) if ref in st.references else None
                if row is not None:
                    rows[name].append(row)
        # the teacher row comes only from a reference run: the teacher's own end-of-pretraining evaluation used
        # another bank (all its training images) and would not be comparable
        order = ["raw pixels", "random init", TEACHER, "supervised", SCRATCH]
        ordered = {k: rows[k] for k in order if rows.get(k)}
        ordered.update({k: v for k, v in rows.items() if k not in ordered and v})
        table[student] = aggregate(ordered)
    return table


def keep_classifier_accuracy(run_dir: Path) -> None:
    """A supervised run's own classifier on the test split, from its last checkpoint, kept in
    ``<run>/classifier.json`` (computed once; nothing when the checkpoint is gone)."""
    from .evaluation.classifier import classifier_accuracy

    kept, ckpt = run_dir / "classifier.json", run_dir / "checkpoints" / "last.ckpt"
    if not kept.exists() and ckpt.exists():
        kept.write_text(json.dumps(classifier_accuracy(ckpt)))


def add_classifier_accuracy(table: dict, steps: list[Step], results: list[dict | None], runs: Path) -> None:
    """The supervised rows' own classifier on the test split (evaluation/classifier.py), from each finished run's
    last checkpoint (:func:`keep_classifier_accuracy`) or its progress record; added to the row as ``classifier``
    (mean, std, runs)."""
    per: dict[str, list[float]] = {}
    for st, res in zip(steps, results):
        if st.method != "supervised" or res is None:
            continue
        run_dir = _find_done(runs, st.tag, step_key(st.module, st.args, st.teacher)).parent
        keep_classifier_accuracy(run_dir)
        kept = run_dir / "classifier.json"
        if not kept.exists():
            continue
        per.setdefault(st.student, []).append(json.loads(kept.read_text())["top1"])
    for student, vals in per.items():
        if "supervised" in table.get(student, {}):
            v = np.array(vals, dtype=float)
            table[student]["supervised"]["classifier"] = [float(v.mean()),
                                                          float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)]


def run_reproduce(cfg: DictConfig) -> dict:
    from .runtime.config import ConfigError

    check_mandatory(cfg, {"name": "reproduce_preset=full|quick|calibrate (or name=<label>)"})
    if cfg.part not in PARTS:
        raise ConfigError(f"part={cfg.part!r} is invalid: choose one of {list(PARTS)}")
    out = Path(cfg.out_dir)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if cfg.part == "record":
        if not cfg.progress:
            raise ConfigError("part=record writes the finished runs into a progress file: add progress=<file>")
        n = save_progress(runs, Path(cfg.progress))
        print(f"[reproduce] progress={cfg.progress}: {n} finished runs recorded", flush=True)
        return {"recorded": n}
    if cfg.candidates:
        return run_calibration(cfg, runs, out)
    teacher_ckpt, t_res = ensure_teacher(cfg, out)  # every part: reused when its hash matches, else built
    check = teacher_check(cfg, out, teacher_ckpt)
    if cfg.part == "teacher":
        if check is not None:
            bars = teacher_bars(check, {}, cfg.teacher_check.bars, TEACHER, SCRATCH)
            print("\n".join(bars_lines(check, bars, table_probe(cfg))), flush=True)
        return {"teacher": t_res, "teacher_check": check}
    ident = "" if cfg.dry_run else teacher_weights(cfg, out)
    student_args = announce_precision(cfg)
    steps = plan_steps(cfg, teacher_ckpt, ident)
    results = execute_recorded(cfg, steps, runs)
    if cfg.dry_run:
        if cfg.ablation.enabled:
            run_ablation(cfg, runs, teacher_ckpt, out)
        return {}
    table = table_rows(cfg, steps, results)
    _, manifest = teacher_files(cfg, out)
    sha = json.loads(manifest.read_text()).get("sha256", "") if manifest.exists() else ""
    command = f"python -m compress_lit.reproduce reproduce_preset={cfg.name}" + \
        (f" precision={cfg.precision}" if cfg.precision is not None else "")
    meta = {"data": cfg.data_name, "command": command,
            "teacher": " ".join(cfg.teacher_args) + (f" (SHA-256 {sha[:12]}...)" if sha else "")
            + (f" (weights SHA-256 {ident[:12]}...)" if ident else ""),
            "student_args": " ".join(student_args), "seeds": list(cfg.seeds),
            "precision": precision_note(steps, results, runs)}
    missing = sum(r is None for r in results)
    if missing:
        meta["notes"] = (f"**Partial table**: {len(results) - missing} of {len(results)} student runs have finished; "
                         f"a row with fewer runs than seeds is incomplete, a missing row has not run yet. The same "
                         f"command continues where it stopped.")
    add_classifier_accuracy(table, steps, results, runs)
    if cfg.progress:
        save_progress(runs, Path(cfg.progress))  # with the supervised runs' classifier.json
        meta["progress"] = (f"runs recorded in {cfg.progress} (each run's results, seconds and command; the "
                            f"reproduction may have continued across machines from it)")
    claims = {s: claim_check(rows) for s, rows in table.items()}
    bars = teacher_bars(check, table, cfg.teacher_check.bars, TEACHER, SCRATCH) if cfg.teacher_check.enabled else []
    stem = out / f"table1_{cfg.data_name}" if cfg.name == "full" else out / f"table1_{cfg.data_name}_{cfg.name}"
    md = markdown_table(table, meta)
    if bars:
        md += "\n" + "\n".join(bars_lines(check, bars, table_probe(cfg))) + "\n"
    Path(f"{stem}.md").write_text(md + "\n")
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "table": table, "claim": claims,
                                                "teacher_check": check, "teacher_bars": bars}, indent=2))
    bar_chart(table, Path(f"{stem}.png"))
    print(Path(f"{stem}.md").read_text(), flush=True)
    if cfg.ablation.enabled:
        run_ablation(cfg, runs, teacher_ckpt, out, ident)
    return table


def run_calibration(cfg: DictConfig, runs: Path, out: Path) -> dict:
    """``reproduce_preset=calibrate``: every candidate on the preset's validation split (``data.holdout`` in its
    ``common_args``: training images held out, the test split never read), each group's best on its metric marked
    as chosen (or, for a group with ``within``, the first within that many points of it); written to
    ``<out_dir>/calibration_<data>.md`` / ``.json``."""
    from .runtime.config import ConfigError

    if not any(a.startswith("data.holdout=") for a in cfg.common_args):
        raise ConfigError("a calibration (candidates) must evaluate on a validation split: add data.holdout=<n> to "
                          "common_args (the test split must never choose a hyperparameter)")
    seen: dict[str, tuple] = {}
    for i, c in enumerate(cfg.candidates):
        if c.within < 0:
            raise ConfigError(f"candidates[{i}].within must be >= 0 (points of top-1), got {c.within}")
        if seen.setdefault(c.group, (c.metric, c.within)) != (c.metric, c.within):
            raise ConfigError(f"candidates[{i}] ({c.label!r}): every candidate of group {c.group!r} must give the "
                              f"same metric and within, got {(c.metric, c.within)} after {seen[c.group]}")
    teacher_ckpt, _ = ensure_teacher(cfg, out)
    ident = "" if cfg.dry_run else teacher_weights(cfg, out)
    student_args = announce_precision(cfg)
    steps = []
    for c in cfg.candidates:
        for seed in cfg.seeds:
            module, args = step_command(cfg, c.student, c.method, seed, teacher_ckpt, tuple(c.overrides))
            steps.append(Step(f"calibrate-{c.student}-{c.method}-{_hash(list(c.overrides))}-s{seed}", module, args,
                              True, c.student, c.method, seed, teacher=ident))
    results = execute_recorded(cfg, steps, runs)
    if cfg.dry_run:
        return {}
    groups: dict[str, list[dict]] = {}
    per = len(cfg.seeds)
    for j, c in enumerate(cfg.candidates):
        res = [_row(r) for r in results[j * per:(j + 1) * per] if r]
        agg = aggregate({c.label: res})[c.label]
        groups.setdefault(c.group, []).append({"label": c.label, "method": c.method, "student": c.student,
                                               "overrides": list(c.overrides), "metric": c.metric,
                                               "within": float(c.within), "scores": agg})
    for cands in groups.values():
        score = [c["scores"].get(c["metric"], [float("-inf")])[0] for c in cands]
        top = max(score)
        pick = next(i for i, v in enumerate(score) if v >= top - cands[0]["within"])
        for i, c in enumerate(cands):
            c["chosen"] = i == pick
    lines = [f"# Calibration on {cfg.data_name}: hyperparameters chosen on a validation split", "",
             f"Command: `python -m compress_lit.reproduce reproduce_preset={cfg.name}`. Every run: "
             f"`{' '.join(student_args)}`; seeds {list(cfg.seeds)}. Precision: "
             f"{precision_note(steps, results, runs)}. The validation split is `data.holdout` "
             "training images (seeded, disjoint from the training images); the test split is never read. "
             + ("Top-1 % on the validation split, one seed (no spread)." if per == 1 else
                f"Top-1 % on the validation split, mean ± std over {per} seeds."), ""]
    for group, cands in groups.items():
        within = cands[0]["within"]
        rule = (f"chosen: the first setting within {within:g} points of the best {cands[0]['metric']}"
                if within else f"chosen: the best {cands[0]['metric']}")
        lines += [f"## {group}", "", f"({rule}.)", "", "| setting | overrides | 1-NN | 20-NN | linear | chosen |",
                  "|---|---|---:|---:|---:|:---:|"]
        for c in cands:
            sc = c["scores"]
            cells = [("–" if m not in sc else f"{sc[m][0]:.2f}" if per == 1 else f"{sc[m][0]:.2f} ± {sc[m][1]:.2f}")
                     for m in ("1-NN", "20-NN", "linear")]
            lines.append(f"| {c['label']} | `{' '.join(c['overrides']) or '(preset)'}` | " + " | ".join(cells)
                         + f" | {'**yes** (' + c['metric'] + ')' if c['chosen'] else ''} |")
        lines.append("")
    stem = out / f"calibration_{cfg.data_name}"
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    Path(f"{stem}.json").write_text(json.dumps({"common_args": list(cfg.common_args), "seeds": list(cfg.seeds),
                                                "groups": groups}, indent=2))
    print(Path(f"{stem}.md").read_text(), flush=True)
    return groups


@entry_main("reproduce")
def main(cfg: DictConfig) -> None:
    run_entry("reproduce", lambda: run_reproduce(cfg), user_errors=(*USER_ERRORS, StepFailed))


if __name__ == "__main__":
    main()
