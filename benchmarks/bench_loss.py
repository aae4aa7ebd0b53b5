"""Peak memory growth and time of the LM-head loss: standard path, checkpointed chunks, forge, peers.

Run (CPU, about 5 minutes on 2 cores with the default 2 rounds)::

    python benchmarks/bench_loss.py                 # both shapes, every row
    python benchmarks/bench_loss.py --shapes 32k --rounds 1

Each measurement is one forward + backward of ``loss(hidden @ weight.T, labels)`` with ``hidden``
and ``weight`` requiring gradients (1 label in 16 is ignored, as padding would be), in a fresh
subprocess so no row inherits another's heap. Rows are interleaved over ``--rounds`` so that load
from other processes on a shared machine hits every row alike.

Memory, on CPU: the growth of the process's peak resident set (``VmHWM``) over its resident set
just before the measured iteration, after resetting the peak with ``/proc/self/clear_refs``. PyTorch's
CPU allocator has no caching and no statistics, and ``tracemalloc`` does not see its allocations, so
the kernel's own accounting of touched pages is the honest measure; it includes the gradient
buffers of ``hidden`` and ``weight`` (the same in every row) and the allocator's slack. On CUDA:
``torch.cuda.max_memory_allocated`` growth after ``reset_peak_memory_stats``.

Time: the best over the rounds (on a shared machine the minimum is the least noisy estimate), each
after a small warm-up call that initialises the BLAS. Memory: the largest over the rounds. Ratios
are against the standard path measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

SHAPES = {
    # name: (batch, seq, hidden, vocab)
    "32k": (4, 1024, 1024, 32000),
    # Llama-3 vocabulary, scaled down from Llama-3-8B at 8 x 4096 tokens (hidden 4096) to fit 24 GiB
    # and 2 cores while keeping its 8 tokens per hidden unit: the ratio of the logits (tokens x
    # vocab) to the weight gradient (vocab x hidden) that any method must hold.
    "128k": (2, 2048, 512, 128256),
}
ROWS = ["standard", "checkpointed", "forge", "liger", "cce"]


def _rss_mib() -> tuple[float, float]:
    with open("/proc/self/status") as f:
        status = f.read()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    return hwm, rss


def _loss_fn(row: str, chunk: int | None):
    import torch
    import torch.nn.functional as F

    if row == "standard":
        # What transformers' ForCausalLMLoss does: full logits, upcast to float32, cross-entropy.
        return lambda h, w, y: F.cross_entropy((h @ w.t()).float(), y)
    if row == "checkpointed":
        from torch.utils.checkpoint import checkpoint

        rows = chunk or 1024

        def ckpt(h, w, y):
            n = (y != -100).sum()
            parts = [
                checkpoint(
                    lambda a, b: F.cross_entropy((a @ w.t()).float(), b, reduction="sum"),
                    h[s : s + rows],
                    y[s : s + rows],
                    use_reentrant=False,
                )
                for s in range(0, h.shape[0], rows)
            ]
            return torch.stack(parts).sum() / n

        return ckpt
    if row == "forge":
        from forge.loss import fused_linear_cross_entropy

        return lambda h, w, y: fused_linear_cross_entropy(h, w, y, chunk_size=chunk)
    if row == "liger":
        from liger_kernel.transformers.functional import (
            liger_fused_linear_cross_entropy,
        )

        return lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y)
    if row == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, y: linear_cross_entropy(h, w, y)
    raise ValueError(row)


def _skip_reason(row: str, device: str) -> str | None:
    import importlib.util

    if row in ("liger", "cce"):
        if device != "cuda":
            return "needs CUDA + Triton"
        module = "liger_kernel" if row == "liger" else "cut_cross_entropy"
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed"
    return None


def measure(row: str, shape: str, device: str, dtype: str, chunk: int | None) -> dict:
    """One row, in this process: a small warm-up, then one measured forward + backward."""
    import torch

    b, t, hdim, vocab = SHAPES[shape]
    dt = getattr(torch, dtype)
    fn = _loss_fn(row, chunk)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def inputs(n: int, v: int):
        torch.manual_seed(0)
        hidden = (torch.randn(n, hdim, device=device, dtype=dt) * 0.5).requires_grad_(True)
        weight = (torch.randn(v, hdim, device=device, dtype=dt) * hdim**-0.5).requires_grad_(True)
        labels = torch.randint(0, v, (n,), device=device)
        labels[::16] = -100
        return hidden, weight, labels

    hidden, weight, labels = inputs(64, 512)
    fn(hidden, weight, labels).backward()
    hidden, weight, labels = inputs(b * t, vocab)
    sync()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss_mib()[1]
    start = time.perf_counter()
    fn(hidden, weight, labels).backward()
    sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mib()[0]
    return {"row": row, "shape": shape, "peak_mib": peak - base, "time_s": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    parser.add_argument("--chunk", type=int, default=None, help="chunk rows for checkpointed / forge")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if args._child:
        row, shape = args._child.split(":")
        print(json.dumps(measure(row, shape, device, dtype, args.chunk)))
        return

    print(f"# bench_loss: device={device} dtype={dtype} threads={torch.get_num_threads()} rounds={args.rounds}")
    for shape in args.shapes:
        b, t, hdim, vocab = SHAPES[shape]
        rows = [r for r in args.rows if _skip_reason(r, device) is None]
        results: dict[str, list[dict]] = {r: [] for r in rows}
        failed: dict[str, str] = {}
        for _ in range(args.rounds):
            for row in rows:
                if row in failed:
                    continue
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--_child",
                    f"{row}:{shape}",
                    "--device",
                    device,
                    "--dtype",
                    dtype,
                ] + (["--chunk", str(args.chunk)] if args.chunk else [])
                proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
                if proc.returncode != 0:
                    failed[row] = (proc.stderr.strip().splitlines() or ["?"])[-1][:80]
                    continue
                results[row].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"\n## batch {b}, seq {t}, hidden {hdim}, vocab {vocab}\n")
        print("| path | peak memory growth (MiB) | time (s) | memory vs standard | time vs standard |")
        print("|---|---:|---:|---:|---:|")
        best = {r: (max(x["peak_mib"] for x in v), min(x["time_s"] for x in v)) for r, v in results.items() if v}
        ref = best.get("standard")
        for row in args.rows:
            reason = _skip_reason(row, device) or (f"failed: {failed[row]}" if row in failed else None)
            if reason:
                print(f"| {row} | skipped: {reason} | | | |")
                continue
            mem, sec = best[row]
            mem_ratio = f"{mem / ref[0]:.3f}" if ref else "-"
            time_ratio = f"{sec / ref[1]:.2f}x" if ref else "-"
            print(f"| {row} | {mem:.0f} | {sec:.2f} | {mem_ratio} | {time_ratio} |", flush=True)


if __name__ == "__main__":
    main()
