"""``forge eval RUN_DIR --data FILE``: held-out loss and perplexity, or DPO reward accuracy and margin."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="held-out loss/perplexity (SFT data) or reward accuracy/margin "
                        "(preference data) of a run's model; lm-eval tasks")
    ev.add_argument("run_dir", help="a forge train output directory (or any model directory)")
    ev.add_argument("--data", help="a data file in any forge format")
    ev.add_argument("--format", help="the data format (default: detected from the columns)")
    ev.add_argument("--max-samples", type=int, help="evaluate only the first N rows")
    ev.add_argument("--columns", help="rename columns first, as YAML: '{question: prompt, answer: completion}'")
    ev.add_argument("--base", action="store_true", help="evaluate the model the run started from")
    ev.add_argument("--beta", type=float, help="DPO beta for the rewards (default: the run's, else 0.1)")
    ev.add_argument("--tasks", help="lm-eval tasks, comma-separated (needs: pip install lm-eval)")
    ev.add_argument("--limit", type=int, help="lm-eval: examples per task")
    ev.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    ev.add_argument("--out", help="also write the metrics to this JSON file")
    ev.set_defaults(func=cmd_eval)


def _columns(text: str | None) -> dict[str, str] | None:
    import yaml

    from forge.errors import ForgeError

    if text is None:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ForgeError(f"--columns {text!r}: expected a mapping of old to new names, "
                         "e.g. '{question: prompt, answer: completion}'")
    return {str(k): v for k, v in value.items()}


def cmd_eval(args: argparse.Namespace) -> int:
    from forge.errors import ForgeError
    from forge.workflow.evaluate import evaluate_run

    if args.max_samples is not None and args.max_samples < 1:
        raise ForgeError(f"--max-samples: expected >= 1, got {args.max_samples}")
    if args.batch_size < 1:
        raise ForgeError(f"--batch-size: expected >= 1, got {args.batch_size}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    result = evaluate_run(args.run_dir, args.data, fmt=args.format, max_samples=args.max_samples,
                          columns=_columns(args.columns), base=args.base, out=args.out, tasks=tasks,
                          limit=args.limit, batch_size=args.batch_size, beta=args.beta)
    if result.get("kind") == "lm" and result.get("loss") is not None:
        print(f"forge: {result['model']} model: loss {result['loss']:.4f}, perplexity "
              f"{result['perplexity']:.2f} over {result['tokens']} tokens of {result['rows']} rows")
    elif result.get("kind") == "preference" and result.get("pairs"):
        print(f"forge: {result['model']} model: reward accuracy {result['reward_accuracy']:.3f}, margin "
              f"{result['reward_margin']:.4f} over {result['pairs']} pairs (beta {result['beta']}, "
              f"reference {result['reference']})")
    print(json.dumps(result, indent=2))
    if args.out:
        print(f"forge: metrics written to {args.out}")
    return 0
