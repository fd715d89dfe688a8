"""A reproduction's progress as a small tracked file: one record per finished run.

`compress_lit.reproduce` keeps each run in ``<out_dir>/runs/<step>-<key>/`` (checkpoints, logs, ``results.json``),
which is too big to keep in git and is lost with the machine. ``progress=<file>`` keeps what the table needs from
every finished run in one JSON file instead: its directory name (step and key: the key covers the command line and
the teacher's weights hash), its ``results.json``, the supervised runs' ``classifier.json`` and its ``step.json``
(wall-clock seconds, threads, command and the precision it ran in: :func:`recorded_precision`). Before running, every record is put back as a finished run directory (nothing that exists
is overwritten); afterwards, every finished run is recorded. A record is reused only under its own key, so a run
distilled from another teacher, or with another command line, is never taken for one of this call's runs.

Without ``progress=`` nothing is read or written: a plain ``make reproduce`` starts from its own ``runs/``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

KEPT = ("results.json", "classifier.json", "step.json")  # what a record holds of its run directory
FORMAT = 1


def save_progress(runs: Path, path: Path) -> int:
    """Record every finished run under ``runs`` (a directory with ``results.json``) into ``path``, keeping the
    records already there for runs this machine no longer has; written atomically. Returns the number of records."""
    path = Path(path)
    records = load_progress(path) if path.exists() else {}
    for done in sorted(Path(runs).glob("*/results.json")):
        records[done.parent.name] = {name: json.loads((done.parent / name).read_text())
                                     for name in KEPT if (done.parent / name).exists()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "runs": dict(sorted(records.items()))}, indent=1) + "\n")
    os.replace(tmp, path)
    return len(records)


def load_progress(path: Path) -> dict[str, dict]:
    """``{run directory name: {file name: content}}`` from a progress file; a malformed one is a ``ConfigError``
    naming it."""
    from ..runtime.config import ConfigError

    path = Path(path)
    try:
        data = json.loads(path.read_text())
        runs = data["runs"]
        if data.get("format") != FORMAT or not isinstance(runs, dict) or \
                not all(isinstance(r, dict) and "results.json" in r for r in runs.values()):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"progress={path}: not a progress file of compress_lit.reproduce (format {FORMAT}: "
                          f"{{'format': 1, 'runs': {{run: {{'results.json': ...}}}}}})") from None
    return runs


def restore_progress(path: Path, runs: Path) -> int:
    """Put every record of ``path`` back under ``runs`` as a finished run directory, leaving a directory that
    already has its ``results.json`` as it is. Returns how many were restored. A missing file restores nothing
    (the first call of a reproduction creates it)."""
    path = Path(path)
    if not path.exists():
        return 0
    restored = 0
    for name, files in load_progress(path).items():
        run_dir = Path(runs) / name
        if (run_dir / "results.json").exists():
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        for fname in KEPT:  # results.json last: a run directory counts as finished only once it is complete
            if fname in files and fname != "results.json":
                (run_dir / fname).write_text(json.dumps(files[fname]))
        (run_dir / "results.json").write_text(json.dumps(files["results.json"]))
        restored += 1
    return restored


def recorded_precision(run_dir: Path) -> str | None:
    """The precision a finished run ran in, from its ``step.json``: its ``precision``, or (a record written before
    that was kept) the ``trainer.precision=`` of its command; None when neither says."""
    step = Path(run_dir) / "step.json"
    if not step.exists():
        return None
    record = json.loads(step.read_text())
    if record.get("precision"):
        return str(record["precision"])
    words = str(record.get("command", "")).split()
    return next((w.split("=", 1)[1] for w in words if w.startswith("trainer.precision=")), None)
