"""Peak memory growth and time of the LM-head loss: transformers' own loss, forge, and the peers.

Run::

    python benchmarks/bench_loss.py                     # CPU: both shapes, every row that runs
    python benchmarks/bench_loss.py --shapes 32k --rounds 1
    python benchmarks/bench_loss.py --device cuda       # the whole GPU table, in one command

Rows (each skipped, with the reason, where it cannot run):

* ``transformers``: ``ForCausalLMLoss`` on the full logits (upcast to float32), the baseline;
* ``checkpointed``: ``torch.utils.checkpoint`` around lm_head + cross-entropy per 1024 tokens;
* ``forge``: :func:`forge.loss.fused_linear_cross_entropy` (Triton rows on CUDA, PyTorch on CPU);
* ``forge_torch``: the same with the PyTorch rows backend (CUDA only: on CPU it *is* ``forge``);
* ``cce_compile``: Cut Cross-Entropy's ``impl="torch_compile"`` (``pip install --no-deps
  cut-cross-entropy``), any device;
* ``cce``: Cut Cross-Entropy's Triton kernel (CUDA); ``liger``: Liger Kernel's
  ``LigerFusedLinearCrossEntropyLoss`` (CUDA);
* ``transformers_eval`` / ``forge_eval``: the forward alone under ``torch.no_grad()``, as in
  evaluation (ratios against ``transformers_eval``).

Each training row is one forward + backward of the loss with ``hidden`` and ``weight`` requiring
gradients (1 label in 16 is ignored, as padding would be), in a fresh subprocess so no row
inherits another's heap. Rows are interleaved over ``--rounds`` so that load from other processes
on a shared machine hits every row alike.

Memory, on CPU: the growth of the process's peak resident set (``VmHWM``) over its resident set
just before the measured iteration, after resetting the peak with ``/proc/self/clear_refs``. PyTorch's
CPU allocator has no caching and no statistics, and ``tracemalloc`` does not see its allocations, so
the kernel's own accounting of touched pages is the honest measure; it includes the gradient
buffers of ``hidden`` and ``weight`` (the same in every row) and the allocator's slack. On CUDA:
``torch.cuda.max_memory_allocated`` growth after ``reset_peak_memory_stats``.

Time: the best over the rounds and ``--iters`` calls per process (on a shared machine the minimum
is the least noisy estimate), each after a warm-up call (BLAS initialisation, Triton and
``torch.compile`` compilation). Memory: the largest over the rounds. Ratios are against
``transformers`` (``transformers_eval`` for the eval rows) measured in the same run.
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
    # Llama-3-8B's LM head at 8 x 4096 tokens: GPU only (the full logits alone are 16 GiB in fp32).
    "8b": (8, 4096, 4096, 128256),
}
CPU_SHAPES = ["32k", "128k"]
ROWS = ["transformers", "checkpointed", "forge", "forge_torch", "cce_compile", "cce", "liger",
        "transformers_eval", "forge_eval"]
CUDA_ONLY = {"forge_torch", "cce", "liger"}
PACKAGE = {"cce": "cut_cross_entropy", "cce_compile": "cut_cross_entropy", "liger": "liger_kernel"}


def _rss_mib() -> tuple[float, float]:
    with open("/proc/self/status") as f:
        status = f.read()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    return hwm, rss


def _loss_fn(row: str, chunk: int | None):
    import torch
    import torch.nn.functional as F

    if row in ("transformers", "transformers_eval"):
        from transformers.loss.loss_utils import ForCausalLMLoss

        # The model's own path: full logits from the LM head, upcast to float32, cross-entropy.
        return lambda h, w, y: ForCausalLMLoss(F.linear(h, w), None, w.shape[0], shift_labels=y)
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
    if row in ("forge", "forge_eval", "forge_torch"):
        from forge.loss import fused_linear_cross_entropy

        backend = "torch" if row == "forge_torch" else "auto"
        return lambda h, w, y: fused_linear_cross_entropy(h, w, y, chunk_size=chunk, backend=backend)
    if row == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, y: liger(w, h, y)
    if row in ("cce", "cce_compile"):
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if row == "cce" else "torch_compile"
        return lambda h, w, y: linear_cross_entropy(h, w, y, impl=impl)
    raise ValueError(row)


def _skip_reason(row: str, device: str) -> str | None:
    import importlib.util

    if row in CUDA_ONLY and device != "cuda":
        return "needs CUDA" + (" + Triton" if row != "forge_torch" else " (on CPU it is the forge row)")
    module = PACKAGE.get(row)
    if module is not None and importlib.util.find_spec(module) is None:
        return f"{module} not installed"
    return None


def measure(row: str, shape: str, device: str, dtype: str, chunk: int | None, iters: int = 1) -> dict:
    """One row, in this process: warm-up calls, then ``iters`` measured forward (+ backward) calls."""
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

    evaluation = row.endswith("_eval")

    def step(h, w, y):
        if evaluation:
            with torch.no_grad():
                fn(h, w, y)
        else:
            fn(h, w, y).backward()

    hidden, weight, labels = inputs(64, 512)
    step(hidden, weight, labels)
    hidden, weight, labels = inputs(b * t, vocab)
    if device == "cuda" or row == "cce_compile":
        step(hidden, weight, labels)  # compile for the real shape too (Triton kernels, torch.compile)
    peak, best = 0.0, float("inf")
    for _ in range(iters):
        hidden.grad = weight.grad = None
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
        step(hidden, weight, labels)
        sync()
        best = min(best, time.perf_counter() - start)
        high = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mib()[0]
        peak = max(peak, high - base)
    return {"row": row, "shape": shape, "peak_mib": peak, "time_s": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                        help=f"default: {' '.join(CPU_SHAPES)} on CPU, all on CUDA")
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=None, help="measured calls per process (1 on CPU, 5 on CUDA)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    parser.add_argument("--chunk", type=int, default=None, help="chunk rows for checkpointed / forge")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    iters = args.iters or (5 if device == "cuda" else 1)
    shapes = args.shapes or (list(SHAPES) if device == "cuda" else CPU_SHAPES)
    if args._child:
        row, shape = args._child.split(":")
        print(json.dumps(measure(row, shape, device, dtype, args.chunk, iters)))
        return

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"# bench_loss: {name}, torch {torch.__version__}, dtype={dtype}, threads={torch.get_num_threads()}, "
          f"rounds={args.rounds}, iters={iters}")
    for shape in shapes:
        b, t, hdim, vocab = SHAPES[shape]
        rows = [r for r in args.rows if _skip_reason(r, device) is None]
        results: dict[str, list[dict]] = {r: [] for r in rows}
        failed: dict[str, str] = {}
        for _ in range(args.rounds):
            for row in rows:
                if row in failed:
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), "--_child", f"{row}:{shape}", "--device", device,
                       "--dtype", dtype, "--iters", str(iters)] + (["--chunk", str(args.chunk)] if args.chunk else [])
                proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
                if proc.returncode != 0:
                    failed[row] = (proc.stderr.strip().splitlines() or ["?"])[-1][:80]
                    continue
                results[row].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"\n## batch {b}, seq {t}, hidden {hdim}, vocab {vocab}\n")
        print("| path | peak memory growth (MiB) | time (s) | memory vs transformers | time vs transformers |")
        print("|---|---:|---:|---:|---:|")
        best = {r: (max(x["peak_mib"] for x in v), min(x["time_s"] for x in v)) for r, v in results.items() if v}
        for row in args.rows:
            reason = _skip_reason(row, device) or (f"failed: {failed[row]}" if row in failed else None)
            if reason:
                print(f"| {row} | skipped: {reason} | | | |")
                continue
            ref = best.get("transformers_eval" if row.endswith("_eval") else "transformers")
            mem, sec = best[row]
            mem_ratio = f"{mem / ref[0]:.3f}" if ref else "-"
            time_ratio = f"{sec / ref[1]:.2f}x" if ref else "-"
            print(f"| {row} | {mem:.0f} | {sec:.3f} | {mem_ratio} | {time_ratio} |", flush=True)


if __name__ == "__main__":
    main()
