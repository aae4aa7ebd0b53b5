"""``python -m forge.report RUN_DIR [--out DIR]``: the same as ``forge report``."""

from __future__ import annotations

import argparse
import sys

from forge.errors import ForgeError
from forge.report.page import write_report


def main(argv: list[str] | None = None) -> int:
    """``python -m forge.report RUN_DIR [--out DIR]``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="forge report", description="HTML report with plots from a run's own files")
    parser.add_argument("run_dir", help="output directory of a finished (or stopped) run")
    parser.add_argument("--out", help="where to write the report (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir, args.out)
    except ForgeError as err:
        print(f"forge: error: {err}", file=sys.stderr)
        return 2
    print(f"forge: report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
