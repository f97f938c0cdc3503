"""`qoqopt report results/*.json`."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """\
examples:
  qoqopt report results/*.json --out results/report           # merge every machine's run
  qoqopt report results/h100.json results/laptop.json --out r

Writes report.md (drift table with Pareto-optimal builds marked, per-domain drift, each build's
mean KLD against the next smaller build's on the same chats, with a paired 95% interval that says
whether these chats tell the two apart, speed per machine side by side, failed variants) and PNG plots: drift against file size and a per-domain
drift heat map for each drift set (runs of one reference, eval set and settings; a second set's plots
end in -2), and decode speed per variant per machine. `qoqopt publish --results
OUT/report.md` puts the tables into the model card.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="merge bench results from several machines into Markdown + plots",
        description="Merge `qoqopt bench` result files into one comparable report.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", nargs="+", type=Path, help="result JSON files written by `qoqopt bench`")
    p.add_argument("--out", type=Path, default=Path("results/report"), help="output folder (default results/report)")
    p.add_argument("--force", action="store_true", help="replace an earlier report in --out (a folder holding report.md; other folders are refused)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report import write_report

    path = write_report(args.results, args.out, force=args.force)
    print(f"wrote {path} and plots in {args.out}")
    return 0
