"""``forge lr-find PRESET``: the range test on a fresh copy of what ``forge train`` would train.

The preset's model, data, batch, optimizer and features are built as for ``forge train`` (into
a temporary directory; nothing is saved), with three changes: no trackers, no checkpoints or
evaluation, and neither EMA nor the gradient monitor (the monitor may hold back exactly the
steps where the loss blows up, which the test must see).

Example:
    >>> result = lr_find_preset(forge.load_preset("demo"), num_steps=100)
    >>> f"--set training.learning_rate={result.suggestion:.2g}"
    '--set training.learning_rate=0.003'
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any

from forge.config.loader import Preset
from forge.core.io import atomic_write_bytes
from forge.tune.lr_find import LRFindResult, lr_find, plot_lr_find


def range_test_preset(preset: Preset, output_dir: str, num_steps: int) -> Preset:
    """The preset as the range test trains it."""
    config = copy.deepcopy(preset.config)
    config["training"].update(output_dir=output_dir, max_steps=num_steps, save_strategy="no",
                              eval_strategy="no", report_to="none")
    config["trackers"] = []
    for section in ("ema", "monitor"):
        config.pop(section, None)
    config["data"].update(eval_path=None, eval_split=None, eval_fraction=None)
    return Preset(preset.name, preset.source, config)


def lr_find_preset(preset: Preset, start_lr: float = 1e-7, end_lr: float = 1.0, num_steps: int = 100,
                   beta: float = 0.98, diverge: float = 4.0) -> LRFindResult:
    """Build the preset's trainer on a fresh model and run :func:`~forge.tune.lr_find.lr_find` on it."""
    from forge.recipes.runner import build_trainer

    tmp = tempfile.mkdtemp(prefix="forge-lr-find-")
    try:
        trainer = build_trainer(range_test_preset(preset, tmp, num_steps))
        return lr_find(trainer, start_lr, end_lr, num_steps, beta=beta, diverge=diverge, restore=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_lr_find(result: LRFindResult, out_dir: str | Path) -> dict[str, Any]:
    """``lr_find.json`` (the curve) and ``lr_find.png`` (when matplotlib is installed) in ``out_dir``.

    Returns:
        ``{"json": path, "png": path or None}``.
    """
    import importlib.util

    from forge.core.io import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(result.to_dict(), out / "lr_find.json")
    png = None
    if importlib.util.find_spec("matplotlib") is not None:
        png = out / "lr_find.png"
        atomic_write_bytes(png, plot_lr_find(result))
    return {"json": out / "lr_find.json", "png": png}
