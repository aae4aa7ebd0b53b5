"""``forge presets list`` and ``forge presets show``."""

from __future__ import annotations

import argparse
import contextlib
import sys

from forge.cli.common import add_preset_options, load


def register(sub: argparse._SubParsersAction) -> None:
    presets = sub.add_parser("presets", help="list or show the shipped presets")
    presets_sub = presets.add_subparsers(dest="presets_command", required=True)
    listing = presets_sub.add_parser("list", help="name and one-line description of each preset")
    listing.set_defaults(func=cmd_list)
    show = presets_sub.add_parser("show", help="print a preset fully resolved, as YAML")
    show.add_argument("preset", help="shipped preset name or a YAML file")
    add_preset_options(show)
    show.set_defaults(func=cmd_show)


def cmd_list(args: argparse.Namespace) -> int:
    from forge.config.loader import list_presets

    presets = list_presets()
    width = max(map(len, presets))
    for name, description in presets.items():
        print(f"{name:<{width}}  {description}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    # stdout carries the YAML alone (`forge presets show lora > mine.yaml` must parse):
    # whatever a library prints while the preset loads goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        text = load(args).to_yaml()
    print(text, end="")
    return 0
