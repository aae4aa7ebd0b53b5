"""Decay schedules for :mod:`forge.ema`, and the one run-length warning the callback may print.

Private: the public knobs live on :class:`forge.ema.EMAWeights` and :class:`forge.ema.EMAConfig`.
"""

from __future__ import annotations

import math
from typing import Any

#: Accepted values of ``warmup``; ``None`` keeps the decay fixed.
WARMUPS: tuple[str | None, ...] = (None, "hyperbolic", "power")


def step_decay(
    step: int,
    *,
    decay: float,
    update_after_step: int = 0,
    warmup: str | None = None,
    inv_gamma: float = 1.0,
    power: float = 2 / 3,
    min_decay: float = 0.0,
) -> float:
    """Per-optimizer-step decay at ``step`` (1-based), before any ``update_every`` compensation.

    ``u = step - update_after_step - 1`` counts the optimizer steps averaged before this one.
    ``u < 0`` returns 0.0: the EMA is a plain copy until averaging starts.

    * ``warmup=None``: ``decay``.
    * ``warmup="hyperbolic"``: ``min(decay, (1 + u) / (10 + u))``, TensorFlow's
      ``ExponentialMovingAverage(num_updates=...)`` form (0.1 on the first average, 0.5 after 8).
    * ``warmup="power"``: ``clamp(1 - (1 + u / inv_gamma) ** -power, min_decay, decay)``, the
      @crowsonkb form used by timm and ema-pytorch (0 on the first average, so it starts as a copy).

    Example:
        >>> step_decay(1, decay=0.999, warmup="hyperbolic")
        0.1
    """
    u = step - update_after_step - 1
    if u < 0:
        return 0.0
    if warmup is None:
        return decay
    if warmup == "hyperbolic":
        return max(min_decay, min(decay, (1 + u) / (10 + u)))
    if warmup == "power":
        if u == 0:  # starts as a copy even with min_decay, as in timm
            return 0.0
        value = 1.0 - (1.0 + u / inv_gamma) ** -power
        return max(min_decay, min(decay, value))
    raise ValueError(f"warmup must be one of {WARMUPS}, got {warmup!r}")


def initial_weight_share(total_steps: int, *, update_every: int = 1, **schedule: float | str | None) -> float:
    """How much of the EMA is still the weights from when averaging started, after ``total_steps``.

    The product of every averaging update's decay; 0.0 when the schedule has a copy step
    (decay 0) inside the run. Used to warn when ``decay`` is too high for the run length.

    Example:
        >>> round(initial_weight_share(1000, decay=0.999), 3)
        0.368
    """
    after = int(schedule.get("update_after_step") or 0)
    log_share = 0.0
    # Plain Python over the update steps: this runs once per training run, and a
    # million-step run costs well under a second.
    for step in range(after + update_every, total_steps + 1, update_every):
        d = step_decay(step, **schedule) ** update_every  # type: ignore[arg-type]
        if d <= 0.0:
            return 0.0
        log_share += math.log(d)
    return math.exp(log_share)


def run_length_advice(
    total_steps: int,
    num_params: int,
    *,
    update_every: int = 1,
    **schedule: float | str | None,
) -> str | None:
    """A one-off warning text when the EMA cannot forget its starting point within the run.

    Returns ``None`` when the starting weights carry at most 1% of the final EMA (the
    average has "warmed up"), or when the run length is unknown.

    Example:
        >>> run_length_advice(200, 10**8, decay=0.999) is not None
        True
    """
    if total_steps <= 0:
        return None
    share = initial_weight_share(total_steps, update_every=update_every, **schedule)
    if share <= 0.01:
        return None
    decay = float(schedule["decay"])  # type: ignore[arg-type]
    averaged = max(1, total_steps - int(schedule.get("update_after_step") or 0))
    # exp(-5) < 1%: a window of a fifth of the run lets the average forget its start.
    suggested = 1.0 - 5.0 / averaged
    window = f"roughly {1 / (1 - decay):,.0f}" if decay < 1.0 else "all"
    text = (
        f"EMA: decay={decay} averages over {window} optimizer steps, but this run "
        f"averages over {averaged:,}; at the end {share:.1%} of the EMA will still be the starting "
        f"weights, so it will mostly lag behind training."
    )
    if suggested < 0.5:
        # A window under two steps is no average at all: no decay makes such a run worth an EMA.
        text += (f" {averaged:,} steps are too few for any EMA to help: train for more steps "
                 "or leave EMA off.")
    else:
        text += f" For this run length use decay <= {math.floor(suggested * 1e4) / 1e4:.4f} (or warmup='power')."
    if num_params < 1_000_000_000:
        text += (
            f" Expect little from EMA on a {num_params / 1e6:,.1f}M-parameter model over a short run: "
            "compare eval_ema_loss with eval_loss before keeping the EMA weights."
        )
    return text


#: Storage dtypes accepted by name; ``"auto"`` keeps each parameter's own dtype.
DTYPES: dict[str, str | None] = {
    "float32": "float32",
    "float64": "float64",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "auto": None,
}


def check_settings(
    *,
    decay: float,
    update_every: int,
    update_after_step: int,
    warmup: str | None,
    inv_gamma: float,
    power: float,
    min_decay: float,
) -> list[str]:
    """Every problem with a set of EMA settings, so they can be reported at once (empty if fine).

    Example:
        >>> check_settings(decay=1.5, update_every=0, update_after_step=0, warmup=None,
        ...                inv_gamma=1.0, power=0.75, min_decay=0.0)[0]
        'decay must be in [0, 1], got 1.5'
    """
    errors = []
    if not 0.0 <= decay <= 1.0:
        errors.append(f"decay must be in [0, 1], got {decay}")
    if int(update_every) != update_every or update_every < 1:
        errors.append(f"update_every must be an integer >= 1, got {update_every}")
    if int(update_after_step) != update_after_step or update_after_step < 0:
        errors.append(f"update_after_step must be an integer >= 0, got {update_after_step}")
    if warmup not in WARMUPS:
        hint = " (did you mean 'hyperbolic'?)" if warmup in ("linear", "tf", "inverse") else ""
        errors.append(f"warmup must be one of {WARMUPS}, got {warmup!r}{hint}")
    if inv_gamma <= 0:
        errors.append(f"inv_gamma must be > 0, got {inv_gamma}")
    if power <= 0:
        errors.append(f"power must be > 0, got {power}")
    if not 0.0 <= min_decay <= max(decay, 0.0):
        errors.append(f"min_decay must be in [0, decay], got {min_decay}")
    return errors


#: The settings that define what the average means (shared by the class, callback and config).
SCHEDULE_KEYS = ("decay", "update_every", "update_after_step", "warmup", "inv_gamma", "power", "min_decay")


def as_dtype(dtype: Any) -> Any:
    """``torch.dtype`` for a dtype or its name; ``None`` for ``"auto"`` / ``None``.

    Example:
        >>> as_dtype("bfloat16")
        torch.bfloat16
    """
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    name = DTYPES[dtype]
    return None if name is None else getattr(torch, name)
