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
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .startup import USER_ERRORS, check_mandatory, run_entry
from .train import CONF_DIR

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
class ReproduceConfig:
    name: str = MISSING  # preset name, used in the output file names
    out_dir: str = "results"
    data_name: str = "fashion_mnist"
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    students: list[str] = field(default_factory=lambda: ["alexnet_small", "resnet18_small"])
    methods: list[str] = field(default_factory=lambda: list(METHOD_LABELS)[:8])
    teacher_args: list[str] = field(default_factory=list)  # compress_lit.pretrain overrides for the teacher
    teacher_overrides: list[str] = field(default_factory=list)  # compress_lit.train overrides that describe it
    common_args: list[str] = field(default_factory=list)  # every student run (data, epochs, eval)
    scratch_args: list[str] = field(default_factory=list)  # MoCo-from-scratch runs only
    train_args: list[str] = field(default_factory=list)  # distillation / supervised runs only
    # methods that run the teacher at every step read it from the K-view feature cache instead (teachers/cache.py):
    # the cache is built once (by the first such run) and shared by every student, seed and method
    cached_methods: list[str] = field(default_factory=list)
    cache_args: list[str] = field(default_factory=list)  # the teacher.cached=... overrides for those runs
    ablation: AblationConfig = field(default_factory=AblationConfig)
    dry_run: bool = False  # print the commands only


ConfigStore.instance().store(name="reproduce_schema", node=ReproduceConfig)


class StepFailed(RuntimeError):
    """A step's command failed; its own one-line error (or traceback) is printed above this one."""


def _hash(args: list[str]) -> str:
    return hashlib.sha1("\0".join(args).encode()).hexdigest()[:10]


def _run_step(module: str, args: list[str], runs: Path, tag: str, dry: bool) -> tuple[Path, dict | None]:
    key = _hash([module, *args])
    run_dir = runs / f"{tag}-{key}"
    done = run_dir / "results.json"
    if not done.exists():  # the same command under another tag (the ablation's centre is a table run)
        done = next(iter(sorted(runs.glob(f"*-{key}/results.json"))), done)
        run_dir = done.parent
    if done.exists():
        print(f"[reproduce] {tag}: reusing {run_dir}", flush=True)
        return run_dir, json.loads(done.read_text())
    cmd = [sys.executable, "-m", module, *args, f"hydra.run.dir={run_dir}"]
    print(f"[reproduce] {tag}: {' '.join(cmd[1:])}", flush=True)
    if dry:
        return run_dir, None
    t0 = time.time()
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise StepFailed(f"step {tag} failed (exit status {rc}; its message is above): python -m {module} "
                         f"{' '.join(args)}")
    print(f"[reproduce] {tag}: done in {time.time() - t0:.0f} s", flush=True)
    return run_dir, json.loads(done.read_text())


def _row(res: dict) -> dict[str, float]:
    return next(iter(res.values()))


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


def markdown_table(table: dict[str, dict[str, dict]], meta: dict) -> str:
    lines = [f"# CompReSS comparison on {meta['data']} (test split; top-1 %, mean ± std over seeds)", "",
             f"Command: `{meta['command']}`. Teacher: {meta['teacher']}. Students: equal epochs and augmentations "
             f"({meta['student_args']}). Seeds: {meta['seeds']}. Final-epoch numbers only; cluster alignment is "
             f"itself a mean over k-means seeds within each run.", ""]
    for student, rows in table.items():
        lines += [f"## {student}", "", "| model | 1-NN | 20-NN | cluster alignment | linear | runs |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, r in rows.items():
            cells = [f"{r[m][0]:.2f} ± {r[m][1]:.2f}" if m in r else "–" for m in METRICS]
            n = max((r[m][2] for m in METRICS if m in r), default=0)
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {n} |")
        lines.append("")
    return "\n".join(lines)


def bar_chart(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4), squeeze=False)
    for ax, (student, rows) in zip(axes[0], table.items()):
        labels = list(rows)
        means = [rows[k]["1-NN"][0] for k in labels]
        stds = [rows[k]["1-NN"][1] for k in labels]
        ax.bar(range(len(labels)), means, yerr=stds, color="tab:blue", capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
        lo = min(means) - 3
        ax.set_ylim(max(0, lo), min(100, max(means) + 2))
        ax.set_ylabel("1-NN top-1 (%)")
        ax.set_title(student)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def step_command(cfg: DictConfig, student: str, method: str, seed: int, teacher_ckpt: Path,
                 extra: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """The module and overrides of one student run; ``extra`` overrides come last (the ablations' changes)."""
    if method == "moco_scratch":  # MoCo v2 from scratch on the student: the pretraining entry point
        return "compress_lit.pretrain", [f"student={student}", f"seed={seed}", *cfg.common_args, *cfg.scratch_args,
                                         *extra]
    args = [*cfg.teacher_overrides, f"teacher.checkpoint={teacher_ckpt}", "teacher.pretrain_if_missing=false",
            f"student={student}", f"method={method}", f"seed={seed}", *cfg.common_args, *cfg.train_args,
            "eval.include_teacher=false", "eval.random_baseline=false"]
    if method in cfg.cached_methods:
        args += list(cfg.cache_args)
    return "compress_lit.train", [*args, *extra]


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


def run_ablation(cfg: DictConfig, runs: Path, teacher_ckpt: Path, out: Path) -> dict:
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
            _, res = _run_step(module, args, runs, tag, cfg.dry_run)
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
            "teacher": " ".join(cfg.teacher_args), "student_args": " ".join(cfg.common_args),
            "seeds": list(ab.seeds)}
    stem = out / f"ablation_{cfg.data_name}" if cfg.name == "full" else out / f"ablation_{cfg.data_name}_{cfg.name}"
    md = markdown_table(table, meta).replace("# CompReSS comparison", "# CompReSS ablations", 1)
    Path(f"{stem}.md").write_text(md + "\n")
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "table": table}, indent=2))
    print(md, flush=True)
    return table


def run_reproduce(cfg: DictConfig) -> dict:
    check_mandatory(cfg, {"name": "reproduce_preset=full|quick (or name=<label>)"})
    out = Path(cfg.out_dir)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    teacher_ckpt = out / "teacher" / f"{cfg.name}_teacher.ckpt"  # relative: run hashes stay checkout-independent
    t_args = [*cfg.teacher_args, f"output={teacher_ckpt}"]
    _, t_res = _run_step("compress_lit.pretrain", t_args, runs, "teacher", cfg.dry_run)
    if not teacher_ckpt.exists() and not cfg.dry_run:
        # the teacher's run was reused but its copy is gone: take it from the run's checkpoints
        from .safety import atomic_copy

        atomic_copy(runs.glob("teacher-*/checkpoints/last.ckpt").__next__(), teacher_ckpt)
    table: dict[str, dict] = {}
    for student in cfg.students:
        rows: dict[str, list] = {"teacher (MoCo v2)": [_row(t_res)] if t_res else []}
        for method in cfg.methods:
            label = METHOD_LABELS.get(method, method)
            rows[label] = []
            for seed in cfg.seeds:
                module, args = step_command(cfg, student, method, seed, teacher_ckpt)
                _, res = _run_step(module, args, runs, f"{student}-{method}-s{seed}", cfg.dry_run)
                if res:
                    rows[label].append(_row(res))
        table[student] = aggregate(rows)
    if cfg.dry_run:
        if cfg.ablation.enabled:
            run_ablation(cfg, runs, teacher_ckpt, out)
        return {}
    meta = {"data": cfg.data_name, "command": f"python -m compress_lit.reproduce reproduce_preset={cfg.name}",
            "teacher": " ".join(cfg.teacher_args), "student_args": " ".join(cfg.common_args),
            "seeds": list(cfg.seeds)}
    stem = out / f"table1_{cfg.data_name}" if cfg.name == "full" else out / f"table1_{cfg.data_name}_{cfg.name}"
    Path(f"{stem}.md").write_text(markdown_table(table, meta) + "\n")
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "table": table}, indent=2))
    bar_chart(table, Path(f"{stem}.png"))
    print(Path(f"{stem}.md").read_text(), flush=True)
    if cfg.ablation.enabled:
        run_ablation(cfg, runs, teacher_ckpt, out)
    return table


@hydra.main(config_path=CONF_DIR, config_name="reproduce", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_entry("reproduce", lambda: run_reproduce(cfg), user_errors=(*USER_ERRORS, StepFailed))


if __name__ == "__main__":
    main()
