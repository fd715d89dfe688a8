"""The comparison's runs: the plan (one step per student, method and seed, and the ablation's points), each step
run once as its own command and reused when its key matches (``step_key``), the cached teacher built first."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from ..runtime.precision import args_precision, command_precision
from .records import restore_progress, save_progress
from .settings import METHOD_LABELS
from .tables import _row, aggregate, markdown_table


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


def keep_classifier_accuracy(run_dir: Path) -> None:
    """A supervised run's own classifier on the test split, from its last checkpoint, kept in
    ``<run>/classifier.json`` (computed once; nothing when the checkpoint is gone)."""
    from ..evaluation.classifier import classifier_accuracy

    kept, ckpt = run_dir / "classifier.json", run_dir / "checkpoints" / "last.ckpt"
    if not kept.exists() and ckpt.exists():
        kept.write_text(json.dumps(classifier_accuracy(ckpt)))


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
