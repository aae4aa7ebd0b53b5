"""Choosing hyperparameters: the learning-rate range test and Optuna sweeps over preset keys.

``lr_find(trainer)`` runs the range test on any HF Trainer (``forge lr-find PRESET`` on a fresh
copy of a preset's model); ``sweep(preset, space, trials)`` searches preset keys with Optuna,
one forge run per trial, pruned on evaluation loss and resumable from its sqlite study
(``forge sweep PRESET --space space.yaml --trials N``).

Example:
    >>> from forge.tune import lr_find
    >>> lr_find(trainer, start_lr=1e-6, end_lr=1.0).suggestion
    0.0031
"""

from forge.tune.lr_find import LRFindResult, LRRangeCallback, lr_find, plot_lr_find, suggest_lr
from forge.tune.space import Param, load_space

__all__ = ["LRFindResult", "LRRangeCallback", "Param", "load_space", "lr_find", "plot_lr_find", "suggest_lr",
           "sweep"]


def __getattr__(name: str):
    # The sweep needs the recipes (each trial is a forge run); import it only when asked for.
    if name == "sweep":
        from forge.tune.sweep import sweep

        return sweep
    raise AttributeError(name)
