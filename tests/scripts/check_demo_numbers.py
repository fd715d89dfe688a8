"""Check that the README shows exactly the table a fresh `make demo` prints (`make check-demo`; CI runs it).

Usage: ``python tests/scripts/check_demo_numbers.py <run dir of the demo> [README.md]``. The table is rebuilt from
the run's ``results.json`` and ``.hydra/config.yaml`` with the same formatting the demo prints
(``compress_lit.evaluation.suite.format_table``) and must appear, character for character, in the README's demo
block, which holds one table per CPU it was measured on (CPU kernels sum in another order on another CPU, so the
numbers differ). Exit 1 with both on a mismatch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from compress_lit.evaluation.suite import format_table


def expected_table(run_dir: Path) -> str:
    results = json.loads((run_dir / "results.json").read_text())
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return format_table(results, cfg.eval.cluster_seeds)


def readme_block(readme: str) -> str:
    """The code block that follows 'What it printed' in the README (the demo's table)."""
    start = readme.index("What it printed")
    body = readme[readme.index("```", start) + 3:]
    return body[body.index("\n") + 1:body.index("```")]


def check(run_dir: Path, readme_path: Path) -> list[str]:
    table, block = expected_table(run_dir), readme_block(readme_path.read_text())
    if table in block:
        return []
    return [f"{readme_path} shows\n{block}\nbut `make demo` printed\n{table}\n"]


def main(argv: list[str]) -> int:
    run_dir = Path(argv[0])
    readme = Path(argv[1]) if len(argv) > 1 else Path("README.md")
    problems = check(run_dir, readme)
    if problems:
        print("README's demo numbers are stale:\n" + "\n".join(problems))
        return 1
    print(f"{readme}: the demo table matches the run in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
