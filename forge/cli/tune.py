"""``forge lr-find [PRESET]`` and ``forge sweep [PRESET] --space space.yaml --trials N``."""

from __future__ import annotations

import argparse

from forge.cli.common import add_preset_options, load, overrides


def register(sub: argparse._SubParsersAction) -> None:
    finder = sub.add_parser("lr-find", help="learning-rate range test: a suggested training.learning_rate")
    finder.add_argument("preset", nargs="?", default="demo", help="shipped preset name or a YAML file")
    add_preset_options(finder)
    finder.add_argument("--start-lr", type=float, default=1e-7, help="rate of the first step (default 1e-7)")
    finder.add_argument("--end-lr", type=float, default=1.0, help="rate of the last step (default 1)")
    finder.add_argument("--steps", type=int, default=100, help="optimizer steps of the sweep (default 100)")
    finder.add_argument("--out", help="where to write lr_find.png and lr_find.json "
                        "(default outputs/lr-find-PRESET)")
    finder.set_defaults(func=cmd_lr_find)

    sweep = sub.add_parser("sweep", help="hyperparameter search over preset keys with Optuna (resumable)")
    sweep.add_argument("preset", nargs="?", default="demo", help="shipped preset name or a YAML file")
    add_preset_options(sweep)
    sweep.add_argument("--space", required=True, help="search space YAML: preset keys and their distributions")
    sweep.add_argument("--trials", type=int, required=True, help="finished trials the study should hold")
    sweep.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    sweep.set_defaults(func=cmd_sweep)


def cmd_lr_find(args: argparse.Namespace) -> int:
    from forge.errors import ForgeError
    from forge.tune.preset import lr_find_preset, write_lr_find

    if not 0 < args.start_lr < args.end_lr:
        raise ForgeError(f"--start-lr {args.start_lr:g} and --end-lr {args.end_lr:g}: expected 0 < start < end")
    if args.steps < 10:
        raise ForgeError(f"--steps: expected at least 10 steps, got {args.steps}")
    preset = load(args)
    result = lr_find_preset(preset, args.start_lr, args.end_lr, args.steps)
    files = write_lr_find(result, args.out or f"outputs/lr-find-{preset.name}")
    where = f"{files['png']} and {files['json']}" if files["png"] else \
        f"{files['json']} (no plot: pip install \"transformers-forge[report]\")"
    lowest = min(range(len(result.smoothed)), key=result.smoothed.__getitem__) if result.smoothed else None
    print(f"forge: lr-find: {len(result.losses)} steps from {result.lrs[0]:.2g} to {result.lrs[-1]:.2g}"
          f"{' (stopped: the loss diverged)' if result.diverged else ''}; curve in {where}")
    if lowest is not None:
        print(f"forge: lr-find: lowest smoothed loss {result.smoothed[lowest]:.4g} at lr {result.lrs[lowest]:.2g}")
    for caveat in result.caveats:
        print(f"forge: lr-find: note: {caveat}")
    if result.suggestion is None:
        print("forge: lr-find: no suggestion from this curve")
        return 1
    print(f"forge: lr-find: suggested learning rate {result.suggestion:.2g} (steepest descent of the smoothed loss)")
    print(f"--set training.learning_rate={result.suggestion:.2g}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from forge.tune.results import format_table
    from forge.tune.sweep import sweep

    result = sweep(args.preset, args.space, args.trials, sweep_dir=args.output_dir,
                   overrides={k: v for k, v in overrides(args) if k != "training.output_dir"}, seed=args.seed)
    print(format_table(result.rows, result.keys))
    print(f"forge: sweep: {len(result.rows)} trials in {result.sweep_dir} (results.csv, report.html); "
          f"this run ran {result.ran}")
    if result.best is None:
        print("forge: sweep: no trial completed")
        return 1
    best = " ".join(f"--set {k}={result.best[k]}" for k in result.keys)
    print(f"forge: sweep: best trial {result.best['trial']}, eval_loss {result.best['eval_loss']:.4g}: {best}")
    return 0
