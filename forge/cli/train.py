"""``forge train`` and ``forge autotune``."""

from __future__ import annotations

import argparse

from forge.cli.common import add_preset_options, load


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a preset (default: the offline demo)")
    train.add_argument("preset", nargs="?", default=None,
                       help="shipped preset name (see `forge presets list`) or a YAML file; "
                       "default: the run's own forge_preset.yaml with --resume, else the demo")
    add_preset_options(train)
    train.add_argument("--overwrite", action="store_true",
                       help="allow writing into a non-empty output directory")
    train.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                       help="continue from the newest checkpoint in the output dir, or CHECKPOINT")
    train.add_argument("--no-doctor", dest="doctor", action="store_false",
                       help="skip the pre-flight checks (see `forge doctor`)")
    train.set_defaults(func=cmd_train)

    autotune = sub.add_parser(
        "autotune", help="find the largest batch that fits, keeping the global batch")
    autotune.add_argument("preset", nargs="?", default="demo",
                          help="shipped preset name or a YAML file")
    add_preset_options(autotune)
    autotune.add_argument("--max-memory", help="memory budget, e.g. 20GB (required on CPU)")
    autotune.add_argument("--target-global-batch", type=int,
                          help="examples per optimizer step across all devices")
    autotune.set_defaults(func=cmd_autotune)


def cmd_train(args: argparse.Namespace) -> int:
    from forge.recipes.runner import train

    preset = load(args)
    result = train(preset, overwrite=args.overwrite, resume=args.resume, doctor=args.doctor)
    trainer = result.trainer
    if trainer is None or trainer.is_world_process_zero():
        losses = [h["loss"] for h in result.log_history if "loss" in h]
        last = f", last logged loss {losses[-1]:.4f}" if losses else ""
        what = "adapter" if preset.peft_config() is not None else "model"
        print(f"forge: trained preset '{preset.name}' for {trainer.state.global_step} steps{last}")
        print(f"forge: {what}, tokenizer and forge_preset.yaml saved in {result.output_dir}")
    return 0


def cmd_autotune(args: argparse.Namespace) -> int:
    from forge.autotune.result import format_table
    from forge.recipes.autotune import autotune_preset

    result = autotune_preset(load(args), max_memory=args.max_memory,
                             target_global_batch=args.target_global_batch)
    print(format_table(result))
    return 0
