"""The report of a pretraining run, or the comparison of several, from their run directories alone.

    python tools/report.py runs/quickstart                      # -> runs/quickstart/report.md, report.html
    python tools/report.py runs/a runs/b --output runs/compare  # -> runs/compare/report.md, report.html

Pretraining writes RUN/report.md and RUN/report.html itself at its end; this makes them again (e.g. after
changing the report code, or for a run copied from another machine). The HTML is self-contained: its plots
are embedded PNGs. Logic: selfsup/report.py.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="pretraining run directories (runs/<name>)")
    parser.add_argument("--output", default="runs/compare",
                        help="folder for the comparison of several runs (default runs/compare)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    from selfsup.report import write_comparison, write_report

    try:
        paths = write_report(args.runs[0]) if len(args.runs) == 1 else write_comparison(args.runs, args.output)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    for path in paths:
        print(path)
    return [str(p) for p in paths]


def cli() -> int:
    """`selfsup-report`."""
    main()
    return 0


if __name__ == "__main__":
    main()
