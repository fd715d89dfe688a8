"""`python -m compress_lit.report <run_dir> [<run_dir> ...] [--out report.md] [--html]`: a report of finished runs.

Per run (a `train`, `pretrain` or `evaluate` run directory): the key configuration (from ``.hydra/config.yaml``:
teacher, student, method, queue, temperature, epochs, data), the command-line overrides, the results table (from
``results.json``), the learning curves (``learning_curves.png``, or drawn from ``csv/metrics.csv``) and the cluster
pictures when present. Several runs get a comparison table first (the settings that differ, and the main model's
results: the student's in a distillation run).

Markdown goes to ``--out`` (stdout without it); the pictures it shows are copied next to it, into
``<out stem>_files/`` (``--assets DIR`` elsewhere, ``--no-copy``: referenced where they are). ``--html`` also
writes a self-contained HTML page (pictures embedded as base64 PNGs): ``<out>.html``, or ``report.html``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .reporting.report import write_report


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compress_lit.report", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", help="run directories (outputs/train/<date>/<time>, multirun jobs, ...)")
    ap.add_argument("--out", help="Markdown file to write (default: print to stdout)")
    ap.add_argument("--html", action="store_true", help="also write a self-contained HTML page (<out>.html, or "
                                                        "report.html without --out)")
    ap.add_argument("--assets", help="folder for the pictures the Markdown shows (default: <out stem>_files/)")
    ap.add_argument("--no-copy", action="store_true", help="reference the pictures where they are")
    ap.add_argument("--title", default="CompReSS report")
    args = ap.parse_args(argv)
    html_out = None
    if args.html:
        html_out = Path(args.out).with_suffix(".html") if args.out else Path("report.html")
    try:
        md = write_report(args.run_dirs, args.out, html_out, args.assets, copy=not args.no_copy, title=args.title)
    except FileNotFoundError as e:
        print(f"compress_lit.report: {type(e).__name__}: {e}", file=sys.stderr)  # as every entry point
        return 2
    if args.out is None:
        print(md)
    else:
        print(f"[compress_lit.report] wrote {args.out}" + (f" and {html_out}" if html_out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
