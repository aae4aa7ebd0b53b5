"""The ``monitor:`` preset section and the options of :class:`~forge.monitor.GradientMonitor`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from forge.monitor.detect import KINDS

Policy = Literal["warn", "skip", "stop"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class MonitorConfig:
    """The ``monitor:`` preset section and the options of :class:`GradientMonitor`.

    Example:
        >>> MonitorConfig(enabled=True, on_spike="skip").on_nonfinite
        'skip'
    """

    enabled: bool = field(default=False, metadata=_help("Attach the gradient monitor."))
    log_every: int | None = field(default=None, metadata=_help(
        "Make the Trainer log at least every N optimizer steps; null follows logging_steps."))
    log_layers: bool = field(default=True, metadata=_help(
        "Send per-block metrics to the trackers (the JSON summary always has them)."))
    update_ratio: bool = field(default=True, metadata=_help(
        "Measure weight norms and update/weight ratios on logging steps (copies the "
        "trainable weights for that one step)."))
    detail_every: int = field(default=10, metadata=_help(
        "Measure update ratios and zero-gradient fractions at most once per N optimizer steps "
        "(on the first logging step of each N): extra passes over the weights that cost more "
        "than the rest of the monitor at every-step logging. Norms, non-finite checks and the "
        "skip decision run every step. 1: on every logging step."))
    on_nonfinite: Policy = field(default="skip", metadata=_help(
        "NaN/inf gradient or loss: warn, skip the optimizer step, or stop."))
    on_spike: Policy = field(default="warn", metadata=_help("Loss spike: warn, skip or stop."))
    on_explode: Policy = field(default="warn", metadata=_help(
        "A block's gradient norm far above its own history: warn, skip or stop."))
    on_vanish: Policy = field(default="warn", metadata=_help(
        "A block's gradient norm far below its own history: warn, skip or stop."))
    on_dead: Policy = field(default="warn", metadata=_help(
        "A trainable parameter or block with all-zero gradients: warn, skip or stop."))
    max_consecutive_skips: int = field(default=5, metadata=_help(
        "Stop with an error when more than this many steps in a row would be skipped."))
    explode_factor: float = field(default=10.0, metadata=_help(
        "Exploding: block gradient norm above this multiple of its running mean."))
    vanish_factor: float = field(default=1e-3, metadata=_help(
        "Vanishing: block gradient norm below this fraction of its running mean."))
    grad_norm_max: float | None = field(default=None, metadata=_help(
        "Also exploding when a block's gradient norm exceeds this absolute value."))
    grad_norm_min: float | None = field(default=None, metadata=_help(
        "Also vanishing when a block's gradient norm falls below this absolute value."))
    history_beta: float = field(default=0.95, metadata=_help(
        "Decay of the running mean of log gradient norms (0.95: about 20 steps)."))
    warmup_steps: int = field(default=10, metadata=_help(
        "Steps of history before explode, vanish and spike checks start."))
    spike_window: int = field(default=50, metadata=_help(
        "Recent losses the spike check compares against (median and MAD)."))
    spike_zscore: float = field(default=6.0, metadata=_help(
        "Loss spike: this many robust standard deviations above the loss's recent level."))
    dead_patience: int = field(default=3, metadata=_help(
        "Dead: all-zero gradient for this many steps in a row (LoRA's A matrices are "
        "zero-gradient on step 1 by design)."))
    peak_flops: float | None = field(default=None, metadata=_help(
        "Accelerator peak FLOP/s for MFU; null: known GPUs' dense bf16 peak, else no MFU."))
    summary_file: str = field(default="monitor_summary.json", metadata=_help(
        "End-of-run JSON summary, relative to output_dir."))

    def __post_init__(self) -> None:
        problems = [f"on_{k}: {getattr(self, 'on_' + k)!r} is not one of warn, skip, stop"
                    for k in KINDS if getattr(self, "on_" + k) not in ("warn", "skip", "stop")]
        minimum = {"max_consecutive_skips": 0, "warmup_steps": 0, "spike_window": 3,
                   "dead_patience": 1, "log_every": 1}
        for name, low in minimum.items():
            value = getattr(self, name)
            if value is not None and value < low:
                problems.append(f"{name}: {value} must be at least {low}")
        if not 0.0 <= self.history_beta < 1.0:
            problems.append(f"history_beta: {self.history_beta} must be in [0, 1)")
        if problems:
            raise ValueError("MonitorConfig: " + "; ".join(problems))


def reserved_bytes(cfg: MonitorConfig, model: Any) -> int:
    """Memory the monitor holds beside a step, for autotune's budget: with ``update_ratio``, a
    copy of the trainable weights on logging steps (kept and refilled in CPU memory).

    Example:
        >>> import torch
        >>> reserved_bytes(MonitorConfig(enabled=True), torch.nn.Linear(4, 4))
        80
    """
    if not cfg.enabled or not cfg.update_ratio:
        return 0
    from forge.core.trainable import trainable_set

    return sum(p.numel() * p.element_size() for p in trainable_set(model).parameters())
