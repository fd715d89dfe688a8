"""The whole comparison (``python -m compress_lit.reproduce``): the teacher built or reused, its check, the
planned runs, the records of their progress, the table and the claim; and the validation-split calibration."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import DictConfig

from ..runtime.precision import PRECISIONS, bf16_slowdown_warning, command_precision
from ..runtime.startup import check_mandatory
from . import runs  # runs._run_step, looked up there at each call
from .records import recorded_precision, save_progress
from .runs import (Step, StepFailed, _find_done, _hash, execute_recorded, keep_classifier_accuracy, plan_steps,
                   run_ablation, step_command, step_key, table_probe)
from .settings import METHOD_LABELS, PARTS
from .tables import SCRATCH, TEACHER, _pick, _row, aggregate, bar_chart, claim_check, markdown_table
from .teacher import _sha256, release_teacher, teacher_files, teacher_weights, weights_sha256
from .teacher_check import bars_lines, run_teacher_check, teacher_bars


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
    run_dir, res = runs._run_step("compress_lit.pretrain", t_args, out / "teacher", "teacher", False)
    if not ckpt.exists():  # the teacher's run was reused but its copy is gone: take it from the run's checkpoints
        from ..runtime.safety import atomic_copy

        atomic_copy(run_dir / "checkpoints" / "last.ckpt", ckpt)
    release_teacher(ckpt)
    record = {"key": key, "command": f"python -m compress_lit.pretrain {' '.join(t_args)}",
              "sha256": _sha256(ckpt), "weights_sha256": weights_sha256(ckpt), "bytes": ckpt.stat().st_size,
              "release": "the backbone's weights only (reproduce.release_teacher); the full Lightning checkpoint "
                         "is the run's checkpoints/last.ckpt",
              "results": res,
              "seconds_this_call": round(time.time() - t0, 1)}
    from ..runtime.safety import atomic_write_bytes

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
    return run_teacher_check(list(cfg.teacher_check.args), teacher_ckpt, sha or "unbuilt", out, runs._run_step,
                             dry=cfg.dry_run, run=cfg.part != "table", teacher_args=teacher_model_args(cfg))


def teacher_model_args(cfg: DictConfig) -> list[str]:
    """``compress_lit.evaluate``'s ``model_format`` / ``model.*`` for the preset's teacher (``teacher=<name>`` of
    ``teacher_overrides``, read from ``conf/teacher/<name>.yaml``): the teacher file is read as a teacher (its
    release form holds the backbone's weights alone, no training config to take the architecture from)."""
    from omegaconf import OmegaConf

    from ..runtime.paths import config_dir

    name = next((o.split("=", 1)[1] for o in cfg.teacher_overrides if o.startswith("teacher=")), None)
    if name is None:
        return []
    t = OmegaConf.load(Path(config_dir()) / "teacher" / f"{name}.yaml")
    args = [f"model_format={t.format}", f"model.arch={t.arch}", f"model.name={t.name}"]
    args += [f"model.small_input={str(bool(t.get('small_input', False))).lower()}"]
    if t.get("width_multiplier") is not None:
        args.append(f"model.width_multiplier={t.width_multiplier}")
    return args


def announce_precision(cfg: DictConfig) -> list[str]:
    """``common_args`` as every student run gets them (``precision`` applied, ``auto`` resolved for this machine),
    after saying once which precision that is and why, and warning where an explicit bf16 would be emulated. A
    ``precision`` Lightning does not know is a ``ConfigError`` naming it."""
    from ..runtime.config import ConfigError

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
    from ..runtime.config import ConfigError

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
    from ..runtime.config import ConfigError

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
