"""The ``forge`` command line.

    forge train [PRESET] [--set KEY=VALUE ...] [--model M] [--data D] [--output-dir O]
    forge autotune [PRESET] --max-memory 20GB [--target-global-batch 64]
    forge report RUN_DIR
    forge presets list
    forge presets show NAME [--set KEY=VALUE ...]

Mistakes a user can make (a bad preset, a missing file, a bad data row) print one line each
on stderr and exit with code 2; nothing in an existing output directory is overwritten
unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from forge import __version__
from forge.errors import ForgeError

EXIT_USAGE = 2


def _add_override_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset value, e.g. --set training.learning_rate=1e-4 "
                        "(repeatable; values are read as YAML)")
    parser.add_argument("--model", help="model name or local path (sets model.name_or_path)")
    parser.add_argument("--data", help="data file or directory (sets data.path)")
    parser.add_argument("--output-dir", help="where to save (sets training.output_dir)")
    parser.add_argument("--max-steps", type=int, help="stop after N steps (sets training.max_steps)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forge", description="Fine-tune HF models from YAML presets (SFT, LoRA, QLoRA, DPO).")
    parser.add_argument("--version", action="version", version=f"forge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a preset (default: the offline demo)")
    train.add_argument("preset", nargs="?", default=None,
                       help="shipped preset name (see `forge presets list`) or a YAML file; "
                       "default: the run's own forge_preset.yaml with --resume, else the demo")
    _add_override_options(train)
    train.add_argument("--overwrite", action="store_true",
                       help="allow writing into a non-empty output directory")
    train.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                       help="continue from the newest checkpoint in the output dir, or CHECKPOINT")

    autotune = sub.add_parser(
        "autotune", help="find the largest batch that fits, keeping the global batch")
    autotune.add_argument("preset", nargs="?", default="demo",
                          help="shipped preset name or a YAML file")
    _add_override_options(autotune)
    autotune.add_argument("--max-memory", help="memory budget, e.g. 20GB (required on CPU)")
    autotune.add_argument("--target-global-batch", type=int,
                          help="examples per optimizer step across all devices")

    report = sub.add_parser("report", help="HTML report with plots from a run's own files")
    report.add_argument("run_dir", help="a forge train output directory")
    report.add_argument("--out", help="where to write the report (default: RUN_DIR/report)")

    presets = sub.add_parser("presets", help="list or show the shipped presets")
    presets_sub = presets.add_subparsers(dest="presets_command", required=True)
    presets_sub.add_parser("list", help="name and one-line description of each preset")
    show = presets_sub.add_parser("show", help="print a preset fully resolved, as YAML")
    show.add_argument("preset", help="shipped preset name or a YAML file")
    _add_override_options(show)
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    from forge.presets import SHORTCUTS

    items = list(args.overrides)
    for option, key in SHORTCUTS.items():
        value = getattr(args, option, None)
        if value is not None:
            # Shortcut values are taken literally, never parsed as YAML.
            items.append((key, value))
    return items


def _load(args: argparse.Namespace):
    from forge.presets import load_preset, parse_override

    pairs = [o if isinstance(o, tuple) else parse_override(o) for o in _overrides(args)]
    preset = args.preset
    if preset is None:
        preset, run_dir = _preset_of_resumed_run(args)
        if run_dir is not None and args.output_dir is None:
            # The run continues where it was: its own directory, not outputs/forge_preset.
            pairs.append(("training.output_dir", run_dir))
    return load_preset(preset, dict(pairs))


def _preset_of_resumed_run(args: argparse.Namespace) -> tuple[str, str | None]:
    """``forge train --resume [CHECKPOINT]`` without a preset: the run's own preset file.

    Returns the preset to load and the run directory it belongs to (None: the demo).
    """
    from pathlib import Path

    from forge.errors import ForgeError
    from forge.runner import PRESET_FILE

    resume = getattr(args, "resume", False)
    if not resume:
        return "demo", None
    run_dir = Path(resume).parent if isinstance(resume, str) else (
        Path(args.output_dir) if args.output_dir else None)
    if run_dir is None:
        return "demo", None
    if not (run_dir / PRESET_FILE).is_file():
        raise ForgeError(f"--resume: no {PRESET_FILE} in '{run_dir}' to tell which preset that run "
                         f"used; name it: forge train PRESET --resume {resume if isinstance(resume, str) else ''}"
                         .rstrip())
    return str(run_dir / PRESET_FILE), str(run_dir)


def cmd_train(args: argparse.Namespace) -> int:
    from forge.runner import train

    preset = _load(args)
    result = train(preset, overwrite=args.overwrite, resume=args.resume)
    trainer = result.trainer
    if trainer is None or trainer.is_world_process_zero():
        losses = [h["loss"] for h in result.log_history if "loss" in h]
        last = f", last logged loss {losses[-1]:.4f}" if losses else ""
        what = "adapter" if preset.peft_config() is not None else "model"
        print(f"forge: trained preset '{preset.name}' for {trainer.state.global_step} steps{last}")
        print(f"forge: {what}, tokenizer and forge_preset.yaml saved in {result.output_dir}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from forge.presets import list_presets

    if args.presets_command == "list":
        presets = list_presets()
        width = max(map(len, presets))
        for name, description in presets.items():
            print(f"{name:<{width}}  {description}")
        return 0
    # stdout carries the YAML alone (`forge presets show lora > mine.yaml` must parse):
    # whatever a library prints while the preset loads goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        text = _load(args).to_yaml()
    print(text, end="")
    return 0


def cmd_autotune(args: argparse.Namespace) -> int:
    from forge.autotune import autotune_preset, format_table

    result = autotune_preset(_load(args), max_memory=args.max_memory,
                             target_global_batch=args.target_global_batch)
    print(format_table(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from forge.report import write_report

    print(f"forge: report written to {write_report(args.run_dir, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``forge`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers 5 warns about an alias TRL itself sets; it is noise to a forge user.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*")
    try:
        commands = {"train": cmd_train, "autotune": cmd_autotune, "report": cmd_report,
                    "presets": cmd_presets}
        return commands[args.command](args)
    except ForgeError as err:
        for line in str(err).splitlines():
            print(f"forge: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("forge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
