"""Check that a fresh `make demo` printed the README's table, within the stated tolerance (`make check-demo`; CI
runs it).

Usage: ``python tests/scripts/check_demo_numbers.py <run dir of the demo> [README.md]``. The run's table is
rebuilt from its ``results.json`` and ``.hydra/config.yaml`` with the formatting the demo prints
(``compress_lit.evaluation.suite.format_table``) and compared with the table in the README's demo block, row by
row and number by number. CPU kernels sum in another order on another CPU (and with another thread count), so a
demo on another machine prints slightly different numbers: each must lie within ``TOLERANCE`` points of the
README's (the spread measured over the CPUs it ran on is stated in the README). Same rows, same columns; exit 1
naming every number outside its tolerance.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from compress_lit.evaluation.suite import format_table

# points of top-1 (%); cluster alignment swings with the k-means seeds (its std over 5 seeds is 3-12 points)
TOLERANCE = {"1-NN": 2.5, "20-NN": 2.5, "linear": 2.5, "cluster": 15.0}
NUMBER = re.compile(r"-?\d+\.\d+(?: ± \d+\.\d+)?")


def expected_table(run_dir: Path) -> str:
    results = json.loads((run_dir / "results.json").read_text())
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return format_table(results, cfg.eval.cluster_seeds)


def readme_block(readme: str) -> str:
    """The code block that follows 'What it printed' in the README (the demo's table)."""
    start = readme.index("What it printed")
    body = readme[readme.index("```", start) + 3:]
    return body[body.index("\n") + 1:body.index("```")]


def parse_table(text: str) -> tuple[list[str], dict[str, list[float]]]:
    """(column names, {model: [values]}) of a ``format_table`` table inside ``text`` (a ``± std`` is dropped)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    head = next(i for i, ln in enumerate(lines) if ln.startswith("model"))
    cols = re.sub(r"\([^)]*\)", "", lines[head]).split()[1:]  # cluster(5 seeds) -> cluster
    rows = {}
    for ln in lines[head + 1:]:
        nums = NUMBER.findall(ln)
        if len(nums) != len(cols):
            break
        name = ln[:ln.index(nums[0])].strip()
        rows[name] = [float(n.split(" ± ")[0]) for n in nums]
    return cols, rows


def check(run_dir: Path, readme_path: Path) -> list[str]:
    table, block = expected_table(run_dir), readme_block(readme_path.read_text())
    (want_cols, want), (got_cols, got) = parse_table(block), parse_table(table)
    if want_cols != got_cols or list(want) != list(got):
        return [f"{readme_path} shows\n{block}\nbut `make demo` printed another table\n{table}\n"]
    problems = []
    for model, values in want.items():
        for col, w, g in zip(want_cols, values, got[model]):
            if abs(w - g) > TOLERANCE[col]:
                problems.append(f"{model}, {col}: README {w:.2f}, this run {g:.2f} (more than {TOLERANCE[col]} "
                                f"points apart)")
    if problems:
        problems.append(f"README's table:\n{block}\nthis run's:\n{table}")
    return problems


def main(argv: list[str]) -> int:
    run_dir = Path(argv[0])
    readme = Path(argv[1]) if len(argv) > 1 else Path("README.md")
    problems = check(run_dir, readme)
    if problems:
        print("README's demo numbers do not match this run:\n" + "\n".join(problems))
        return 1
    print(f"{readme}: the demo table matches the run in {run_dir} within the tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
