"""What several commands share: the preset options (``--set``, ``--model``, ...) and loading
the preset they describe."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from forge.errors import ForgeError


def add_preset_options(parser: argparse.ArgumentParser) -> None:
    """``--set`` and the shortcuts that set one preset key each."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset value, e.g. --set training.learning_rate=1e-4 "
                        "(repeatable; values are read as YAML)")
    parser.add_argument("--model", help="model name, local path, builtin:NAME (see `forge models list`) "
                        "or a .gguf file (sets model.name_or_path, and model.gguf_file for a .gguf)")
    parser.add_argument("--data", help="data file or directory (sets data.path)")
    parser.add_argument("--output-dir", help="where to save (sets training.output_dir)")
    parser.add_argument("--max-steps", type=int, help="stop after N steps (sets training.max_steps)")


def overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """Every ``--set`` and shortcut as ``(dotted key, value)``, in command-line order."""
    from forge.config.loader import SHORTCUTS, parse_override, shortcut_overrides

    items = [parse_override(o) for o in args.overrides]
    for option in SHORTCUTS:
        value = getattr(args, option, None)
        if value is not None:
            # Shortcut values are taken literally, never parsed as YAML.
            items.extend(shortcut_overrides(option, value))
    return items


def load(args: argparse.Namespace) -> Any:
    """The preset the command line names, with its overrides (see :func:`preset_of_resumed_run`)."""
    from forge.config.loader import load_preset

    pairs = overrides(args)
    preset = args.preset
    if preset is None:
        preset, run_dir = preset_of_resumed_run(args)
        if run_dir is not None and args.output_dir is None:
            # The run continues where it was: its own directory, not outputs/forge_preset.
            pairs.append(("training.output_dir", run_dir))
    return load_preset(preset, dict(pairs))


def preset_of_resumed_run(args: argparse.Namespace) -> tuple[str, str | None]:
    """``forge train --resume [CHECKPOINT]`` without a preset: the run's own preset file.

    Returns the preset to load and the run directory it belongs to (None: the demo).
    """
    from forge.core.paths import PRESET_FILE

    resume = getattr(args, "resume", False)
    if not resume:
        return "demo", None
    run_dir = Path(resume).parent if isinstance(resume, str) else (
        Path(args.output_dir) if args.output_dir else None)
    if run_dir is None:
        return "demo", None
    if not (run_dir / PRESET_FILE).is_file():
        target = resume if isinstance(resume, str) else ""
        raise ForgeError(f"--resume: no {PRESET_FILE} in '{run_dir}' to tell which preset that run "
                         f"used; name it: forge train PRESET --resume {target}".rstrip())
    return str(run_dir / PRESET_FILE), str(run_dir)
