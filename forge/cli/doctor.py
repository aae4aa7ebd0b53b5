"""``forge doctor [PRESET]``: the pre-flight checks, one line each, exit 1 on a FAIL."""

from __future__ import annotations

import argparse

from forge.cli.common import add_preset_options, load

EXIT_FAIL = 1


def register(sub: argparse._SubParsersAction) -> None:
    doctor = sub.add_parser(
        "doctor", help="check a preset before training: loss mask, EOS, truncation, packing, data, "
        "feature combination, memory (and resume)")
    doctor.add_argument("preset", nargs="?", default="demo", help="shipped preset name or a YAML file")
    add_preset_options(doctor)
    doctor.add_argument("--max-memory", help="memory budget per device for the memory check, e.g. 24GB "
                        "(default: the GPU's free memory, or the machine's RAM)")
    doctor.add_argument("--resume-check", action="store_true",
                        help="also train two steps, save, resume and compare to two straight steps (slow)")
    doctor.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the memory check (it loads the model and measures one step)")
    doctor.add_argument("--sample", type=int, default=512, help="data rows to check (default 512)")
    doctor.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from forge.doctor import failures, format_checks, summary
    from forge.errors import ForgeError
    from forge.recipes.doctor import doctor_preset

    if args.sample < 1:
        raise ForgeError(f"--sample: expected a positive number of rows, got {args.sample}")
    preset = load(args)
    checks = doctor_preset(preset, max_memory=args.max_memory, resume=args.resume_check,
                           sample=args.sample, memory=args.memory)
    print(f"forge doctor: preset '{preset.name}' ({preset.model.name_or_path}, {preset.data.path})")
    print(format_checks(checks))
    print(f"forge doctor: {summary(checks)}")
    return EXIT_FAIL if failures(checks) else 0
