"""The ``forge`` command line: one module per command group, each adding its own subcommands.

    forge train [PRESET] [--set KEY=VALUE ...] [--model M] [--data D] [--output-dir O]
    forge autotune [PRESET] --max-memory 20GB [--target-global-batch 64]
    forge merge RUN_DIR [--out DIR] [--dtype bfloat16] [--dequantize]
    forge chat RUN_DIR [--base]
    forge generate RUN_DIR --prompt TEXT | --prompts FILE [--out FILE] [--base]
    forge eval RUN_DIR --data FILE [--out FILE] [--base] [--tasks T1,T2]
    forge doctor [PRESET] [--max-memory 20GB] [--resume-check]
    forge lr-find [PRESET]
    forge sweep [PRESET] --space space.yaml --trials N
    forge report RUN_DIR
    forge presets list
    forge presets show NAME [--set KEY=VALUE ...]
    forge models list
    forge models fetch NAME

Mistakes a user can make (a bad preset, a missing file, a bad data row) print one line each
on stderr and exit with code 2; faults outside their control (a full disk) exit with code 1;
nothing in an existing output directory is overwritten unless ``--overwrite`` is given. A command module has ``register(subparsers)``, which adds
its parsers and sets ``func`` (called with the parsed arguments, returning the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from forge import __version__
from forge.core.distributed import is_main_process
from forge.errors import ForgeError

EXIT_USAGE = 2
# Command modules, in the order `forge --help` lists them.
COMMAND_MODULES = ("forge.cli.train", "forge.cli.doctor", "forge.cli.tune", "forge.cli.merge",
                   "forge.cli.chat", "forge.cli.eval", "forge.cli.report", "forge.cli.presets",
                   "forge.cli.models")


class _Parser(argparse.ArgumentParser):
    """argparse, but a command-line mistake reads like every other: one ``forge: error:`` line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("forge").strip()
        self.exit(EXIT_USAGE, f"forge: error: {command + ': ' if command else ''}{message} "
                  f"(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``forge`` argument parser with every command module's subcommands."""
    parser = _Parser(
        prog="forge", description="Fine-tune HF models from YAML presets (SFT, LoRA, QLoRA, DPO, ...), "
        "then merge, chat, generate and evaluate.")
    parser.add_argument("--version", action="version", version=f"forge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``forge`` console script; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a mistake argparse reported
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers 5 warns about an alias TRL itself sets; it is noise to a forge user.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*")
    try:
        return args.func(args)
    except ForgeError as err:  # a ForgeFault (a full disk) is not the user's mistake: exit 1
        if is_main_process():  # every rank of a launch finds the same mistake; say it once
            for line in str(err).splitlines():
                print(f"forge: error: {line}", file=sys.stderr)
        return getattr(err, "exit_code", EXIT_USAGE)
    except KeyboardInterrupt:
        print("forge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
