"""Does ``forge lr-find`` on the demo suggest a rate close to the best of real demo runs?

    python benchmarks/bench_lr_find.py [--grid 3e-4 1e-3 3e-3 1e-2 3e-2] [--steps 100]

One range test on the demo preset (its defaults: 1e-7 to 1 over 100 steps), then the whole
demo trained at each rate of a grid (half-decade steps), each run scored by its final
evaluation loss on a held-out 10% of the rows (``data.eval_fraction: 0.1``, the same split for
every run). Passes when the suggestion is within a factor of 3 of the best grid rate. Also
prints the suggestions of two other common rules on the same curve, for the record
(``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def grid_run(lr: float, root: str) -> float:
    """Train the demo at ``lr``; return its final evaluation loss."""
    import contextlib
    import io

    import forge
    from forge.recipes.runner import train

    preset = forge.load_preset("demo", {"training.learning_rate": lr, "data.eval_fraction": 0.1,
                                        "training.output_dir": os.path.join(root, f"lr-{lr:g}")})
    with contextlib.redirect_stdout(io.StringIO()):
        result = train(preset, overwrite=True, doctor=False)
        return float(result.trainer.evaluate()["eval_loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--steps", type=int, default=100)
    cli = parser.parse_args()

    import numpy as np
    import torch

    import forge
    from forge.tune.lr_find import smooth_losses, suggest_lr
    from forge.tune.preset import lr_find_preset

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    started = time.perf_counter()
    result = lr_find_preset(forge.load_preset("demo", {"data.eval_fraction": 0.1}), num_steps=cli.steps)
    seconds = time.perf_counter() - started
    print(f"range test: {len(result.losses)} steps in {seconds:.0f}s, suggestion {result.suggestion:.3g}")
    others = {}
    raw = np.asarray(result.losses)
    for beta in (0.95, 0.98):  # the causal EMA of pytorch-lr-finder (0.95) and fastai (0.98)
        smoothed = smooth_losses(result.losses, beta)
        index, _ = suggest_lr(result.lrs, smoothed)
        others[f"steepest, causal EMA beta={beta}"] = result.lrs[index] if index is not None else float("nan")
    others["minimum / 10"] = result.lrs[int(np.argmin(result.smoothed))] / 10
    for name, value in others.items():
        print(f"  other rule, {name}: {value:.3g}")
    print(f"  raw loss lowest at lr {result.lrs[int(np.argmin(raw))]:.3g}")

    root = tempfile.mkdtemp(prefix="bench-lr-find-")
    try:
        scores = {}
        for lr in cli.grid:
            t0 = time.perf_counter()
            scores[lr] = grid_run(lr, root)
            print(f"demo at lr {lr:g}: eval_loss {scores[lr]:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = min(scores, key=scores.get)
    factor = max(result.suggestion / best, best / result.suggestion)
    print(f"best grid rate {best:g} (eval_loss {scores[best]:.4f}); suggestion {result.suggestion:.3g} is "
          f"{factor:.2f}x off: {'PASS' if factor <= 3 else 'FAIL'} (within 3x)")


if __name__ == "__main__":
    main()
