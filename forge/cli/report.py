"""``forge report RUN_DIR``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="HTML report with plots from a run's own files")
    report.add_argument("run_dir", help="a forge train output directory")
    report.add_argument("--out", help="where to write the report (default: RUN_DIR/report)")
    report.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from forge.report.page import write_report

    print(f"forge: report written to {write_report(args.run_dir, args.out)}")
    return 0
