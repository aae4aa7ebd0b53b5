"""The learning-rate range test (Smith, 2015; the fastai "LR finder") on any HF Trainer.

The run trains for ``num_steps`` optimizer steps while the learning rate grows exponentially
from ``start_lr`` to ``end_lr``, and records the loss of every step. The loss is smoothed
(a debiased exponential moving average, as fastai does) and the suggestion is the rate where
the smoothed loss falls fastest per decade of learning rate, before its minimum. The sweep
stops early once the smoothed loss is ``diverge`` times its best (it has blown up).

Caveats, which the result lists where they apply: the suggestion is a heuristic from a short,
noisy run; the loss of a sweep lags the rate (each step sees the weights of all earlier, smaller
rates), so it leans late; where the curve has no clear descent, it means little. Confirm it
with a short run, or search around it with ``forge sweep``.

Example:
    >>> result = lr_find(trainer, start_lr=1e-6, end_lr=1.0, num_steps=100)   # weights restored after
    >>> result.suggestion
    0.0031
    >>> Path("lr_find.png").write_bytes(plot_lr_find(result))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

__all__ = ["LRFindResult", "LRRangeCallback", "exponential_lrs", "lr_find", "plot_lr_find", "smooth_losses",
           "suggest_lr"]

CAVEAT = ("a heuristic from one short, noisy sweep whose loss lags the rate; confirm it with a short run "
          "(or search around it with forge sweep)")


@dataclass
class LRFindResult:
    """The sweep: the rate and loss of every step, the smoothed loss and the suggestion.

    Attributes:
        lrs, losses, smoothed: per optimizer step.
        suggestion: the suggested learning rate, or None where the curve gives none.
        index: the step the suggestion comes from.
        caveats: what to keep in mind about this curve.
        diverged: the sweep stopped early because the loss blew up.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    index: int | None
    caveats: list[str] = field(default_factory=list)
    diverged: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def exponential_lrs(start_lr: float, end_lr: float, num_steps: int) -> list[float]:
    """``num_steps`` rates from ``start_lr`` to ``end_lr``, evenly spaced on a log scale.

    Example:
        >>> exponential_lrs(1e-4, 1e-2, 3)
        [0.0001, 0.001, 0.01]
    """
    if not 0 < start_lr < end_lr or num_steps < 2:
        raise ValueError(f"need 0 < start_lr < end_lr and num_steps >= 2, got {start_lr}, {end_lr}, {num_steps}")
    ratio = end_lr / start_lr
    return [start_lr * ratio ** (i / (num_steps - 1)) for i in range(num_steps)]


def smooth_losses(losses: list[float], beta: float = 0.98) -> list[float]:
    """A debiased exponential moving average: step ``t`` weighs step ``t - k`` by ``beta**k``.

    Example:
        >>> smooth_losses([1.0, 1.0, 1.0])
        [1.0, 1.0, 1.0]
    """
    out, avg = [], 0.0
    for t, loss in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** t))
    return out


def suggest_lr(lrs: list[float], smoothed: list[float], skip_start: int | None = None) -> tuple[int | None, list[str]]:
    """The step of steepest descent of ``smoothed`` against ``log10(lr)``, before its minimum.

    Args:
        lrs: the rate of each step.
        smoothed: the smoothed loss of each step.
        skip_start: leading steps left out (the average is still settling there); default 5%.

    Returns:
        The index of the suggestion (None: the loss never fell), and the caveats of this curve.
    """
    import numpy as np

    n = len(smoothed)
    caveats = []
    if n < 5:
        return None, ["too few steps to read a curve from; run more --steps"]
    skip = max(1, n // 20) if skip_start is None else skip_start
    values = np.asarray(smoothed, dtype=float)
    lowest = int(np.nanargmin(values))
    if lowest <= skip + 1:
        return None, ["the loss only rose over the range: lower --start-lr (or check the data)"]
    logs = np.log10(np.asarray(lrs[: lowest + 1], dtype=float))
    slope = np.gradient(values[: lowest + 1], logs)
    index = skip + int(np.argmin(slope[skip:]))
    if slope[index] >= 0:
        return None, ["the loss never fell over the range: lower --start-lr (or check the data)"]
    if index <= skip + 1:
        caveats.append("the steepest descent is at the start of the range: lower --start-lr to see where it begins")
    if lowest >= n - 2:
        caveats.append("the loss was still falling at --end-lr: raise it to see where it turns")
    return index, caveats


class LRRangeCallback(TrainerCallback):
    """Records the loss of every logged step and stops the run once the smoothed loss diverges."""

    def __init__(self, lrs: list[float], beta: float = 0.98, diverge: float = 4.0) -> None:
        self.lrs = lrs
        self.beta = beta
        self.diverge = diverge
        self.losses: list[float] = []
        self.diverged = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None or "train_runtime" in (logs or {}):
            return control
        self.losses.append(float(loss))
        smoothed = smooth_losses(self.losses, self.beta)
        best = min(smoothed)
        if not math.isfinite(smoothed[-1]) or (len(smoothed) > 5 and smoothed[-1] > self.diverge * best):
            self.diverged = True
            control.should_training_stop = True
        return control


def lr_find(trainer: Any, start_lr: float = 1e-7, end_lr: float = 1.0, num_steps: int = 100,
            beta: float = 0.98, diverge: float = 4.0, restore: bool = True) -> LRFindResult:
    """Run the range test on a built ``Trainer`` (its optimizer, batch, accumulation and loss).

    Args:
        trainer: any HF ``Trainer`` (TRL's included), not trained yet; its callbacks see the run.
        start_lr, end_lr: the range of the sweep (the rate of the first and the last step).
        num_steps: optimizer steps (the usual: 100 to a few hundred).
        beta: smoothing of the loss (0.98 as fastai).
        diverge: stop once the smoothed loss is this many times its best.
        restore: put the weights and the arguments back afterwards (the trainer can then train).

    Returns:
        An :class:`LRFindResult`.
    """
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    lrs = exponential_lrs(start_lr, end_lr, num_steps)
    args = trainer.args
    changed = {"max_steps": num_steps, "logging_steps": 1, "logging_strategy": "steps", "save_strategy": "no",
               "eval_strategy": "no", "logging_first_step": False}
    saved_args = {k: getattr(args, k) for k in changed}
    saved_weights = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()} \
        if restore else None
    for key, value in changed.items():
        setattr(args, key, value)
    trainer.optimizer, trainer.lr_scheduler = None, None
    trainer.create_optimizer()
    base = float(args.learning_rate)
    # The schedule multiplies each group's own rate, so layer-wise LR keeps its ratios.
    trainer.lr_scheduler = LambdaLR(trainer.optimizer, lambda step: lrs[min(step, num_steps - 1)] / base)
    recorder = LRRangeCallback(lrs, beta, diverge)
    trainer.add_callback(recorder)
    # One log line per step is the run's own business here: the result is the curve.
    printers = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, (PrinterCallback, ProgressCallback))]
    for callback in printers:
        trainer.remove_callback(callback)
    try:
        trainer.train()
    finally:
        trainer.remove_callback(recorder)
        for callback in printers:
            trainer.add_callback(callback)
        for key, value in saved_args.items():
            setattr(args, key, value)
        trainer.optimizer, trainer.lr_scheduler = None, None
        if saved_weights is not None:
            with torch.no_grad():
                trainer.model.load_state_dict(saved_weights)
    losses = recorder.losses
    steps = lrs[: len(losses)]
    smoothed = smooth_losses(losses, beta)
    index, caveats = suggest_lr(steps, smoothed)
    return LRFindResult(lrs=steps, losses=losses, smoothed=smoothed,
                        suggestion=steps[index] if index is not None else None, index=index,
                        caveats=[*caveats, CAVEAT], diverged=recorder.diverged)


def plot_lr_find(result: LRFindResult) -> bytes:
    """The curve as a PNG: loss and smoothed loss over a log-scaled rate, the suggestion marked.

    Raises:
        ImportError: matplotlib is missing (``pip install "transformers-forge[report]"``).
    """
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, color="#bbbbbb", linewidth=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="#1f77b4", linewidth=2, label="smoothed")
    if result.suggestion is not None:
        ax.axvline(result.suggestion, color="#d62728", linestyle="--",
                   label=f"suggestion {result.suggestion:.2g}")
    ax.set_xscale("log")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    if finite:  # keep the blow-up at the end from flattening the curve
        ax.set_ylim(min(finite) * 0.95, min(max(finite), 2.5 * finite[0]) * 1.05)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
