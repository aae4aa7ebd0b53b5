"""``forge merge RUN_DIR``: the run's adapter folded into its base, saved as a plain model."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    merge = sub.add_parser("merge", help="merge a LoRA/DoRA adapter into its base; save a plain model")
    merge.add_argument("run_dir", help="a forge train output directory holding an adapter")
    merge.add_argument("--out", help="where to save the merged model (default: RUN_DIR/merged)")
    merge.add_argument("--dtype", help="dtype of the saved weights: bfloat16, float16, float32 "
                       "(default: the base checkpoint's)")
    merge.add_argument("--dequantize", action="store_true",
                       help="QLoRA: merge into the dequantized 4-bit base (the weights the adapter "
                       "trained against) instead of the original unquantized one")
    merge.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    merge.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    from forge.workflow.merge import merge_run

    merge_run(args.run_dir, args.out, args.dtype, dequantize=args.dequantize, overwrite=args.overwrite)
    return 0
