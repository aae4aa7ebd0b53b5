"""``forge chat RUN_DIR`` (interactive, streamed) and ``forge generate RUN_DIR`` (batch, to JSON Lines)."""

from __future__ import annotations

import argparse
import sys


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a forge train output directory (or any model directory)")
    parser.add_argument("--base", action="store_true",
                        help="use the model the run started from (the base of an adapter run)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default) decodes greedily; above 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature")


def register(sub: argparse._SubParsersAction) -> None:
    chat = sub.add_parser("chat", help="talk to a run's model (chat template, streamed answers)")
    _add_generation_options(chat)
    chat.add_argument("--system", help="a system message that opens the conversation")
    chat.set_defaults(func=cmd_chat)

    gen = sub.add_parser("generate", help="answers to prompts from a run's model, written as JSON Lines")
    _add_generation_options(gen)
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts", help="a file of prompts: {\"prompt\": ...} rows or any forge SFT "
                     "format (its answers become `reference`)")
    gen.add_argument("--out", help="the JSON Lines file to write (default: RUN_DIR/generations.jsonl, "
                     "generations_base.jsonl with --base)")
    gen.add_argument("--raw", action="store_true",
                     help="no chat template: continue each prompt as plain text (continued pre-training)")
    gen.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature)")
    gen.set_defaults(func=cmd_generate)


def _check(args: argparse.Namespace) -> None:
    from forge.errors import ForgeError

    if args.max_new_tokens < 1:
        raise ForgeError(f"--max-new-tokens: expected >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ForgeError("--temperature must be >= 0 and --top-p in (0, 1]")


def cmd_chat(args: argparse.Namespace) -> int:
    from forge.workflow.generate import chat
    from forge.workflow.run import load_run_tokenizer, load_start, load_trained, read_run

    _check(args)
    run = read_run(args.run_dir)
    tokenizer = load_run_tokenizer(run)
    model = load_start(run) if args.base else load_trained(run)
    which = f"the model {run.path} started from ({run.start})" if args.base else f"the model of {run.path}"
    print(f"forge: chatting with {which}; /reset starts over, /exit (or Ctrl-D) ends", flush=True)
    lines = _prompted_lines() if sys.stdin.isatty() else sys.stdin
    chat(model, tokenizer, lines, system=args.system, max_new_tokens=args.max_new_tokens,
         temperature=args.temperature, top_p=args.top_p)
    return 0


def _prompted_lines():
    while True:
        try:
            yield input("you: ")
        except EOFError:
            print()
            return


def cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from forge.errors import ForgeError
    from forge.workflow.generate import generate_run, read_prompts

    _check(args)
    if bool(args.prompt) == bool(args.prompts):
        raise ForgeError("forge generate: give --prompt TEXT (repeatable) or --prompts FILE, not both")
    if args.prompts:
        prompts = read_prompts(args.prompts, raw=args.raw)
    else:
        prompts = [{"prompt": p if args.raw else [{"role": "user", "content": p}], "reference": None}
                   for p in args.prompt]
    out = args.out or str(Path(args.run_dir, "generations_base.jsonl" if args.base else "generations.jsonl"))
    rows = generate_run(args.run_dir, prompts, out=out, base=args.base, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                        raw=args.raw, seed=args.seed)
    print(f"forge: {len(rows)} answers written to {out}")
    return 0
