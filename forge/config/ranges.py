"""Ranges of the numeric preset keys, checked before anything loads (:func:`out_of_range`).

Example:
    >>> out_of_range("training.learning_rate", -1)
    'expected a value in [0, inf), got -1'
"""

from __future__ import annotations

import math
import re
from typing import Any

from forge.core.typecheck import shown

# Ranges of the numeric keys a hurried user gets wrong; checked before anything loads, so a
# batch of 0 or a negative learning rate is one line at once, not a traceback after the model
# load. Each is (low, high, "[" or "(" for the low end, "]" or ")" for the high end); None
# is unbounded. Every float, in any section, must also be finite.
RANGES: dict[str, tuple[float | None, float | None, str, str]] = {
    "training.learning_rate": (0, None, "[", "]"),
    "training.weight_decay": (0, None, "[", "]"),
    "training.max_grad_norm": (0, None, "[", "]"),
    "training.adam_beta1": (0, 1, "[", ")"),
    "training.adam_beta2": (0, 1, "[", ")"),
    "training.adam_epsilon": (0, None, "(", "]"),
    "training.num_train_epochs": (0, None, "(", "]"),
    "training.per_device_train_batch_size": (1, None, "[", "]"),
    "training.per_device_eval_batch_size": (1, None, "[", "]"),
    "training.gradient_accumulation_steps": (1, None, "[", "]"),
    "training.eval_accumulation_steps": (1, None, "[", "]"),
    "training.warmup_steps": (0, None, "[", "]"),
    "training.warmup_ratio": (0, 1, "[", "]"),
    "training.logging_steps": (0, None, "(", "]"),
    "training.save_steps": (0, None, "(", "]"),
    "training.eval_steps": (0, None, "(", "]"),
    "training.save_total_limit": (1, None, "[", "]"),
    "training.seed": (0, 2**32 - 1, "[", "]"),  # numpy's seed range (set_seed seeds it)
    "training.data_seed": (0, 2**32 - 1, "[", "]"),
    "training.dataloader_num_workers": (0, None, "[", "]"),
    "training.dataloader_prefetch_factor": (1, None, "[", "]"),
    "training.dataset_num_proc": (1, None, "[", "]"),
    "training.label_smoothing_factor": (0, 1, "[", ")"),
    "training.neftune_noise_alpha": (0, None, "(", "]"),
    "training.torch_empty_cache_steps": (1, None, "[", "]"),
    "training.eval_delay": (0, None, "[", "]"),
    "training.ddp_timeout": (1, None, "[", "]"),
    "training.ddp_bucket_cap_mb": (1, None, "[", "]"),
    "training.beta": (0, None, "(", "]"),
    "training.label_smoothing": (0, 0.5, "[", "]"),  # DPO's robust/cDPO label noise
    "training.ref_model_mixup_alpha": (0, 1, "[", "]"),
    "training.ref_model_sync_steps": (1, None, "[", "]"),
    "training.precompute_ref_batch_size": (1, None, "[", "]"),
    "training.ld_alpha": (0, 1, "[", "]"),
    "training.discopop_tau": (0, None, "(", "]"),
    "data.max_length": (1, None, "[", "]"),
    "data.max_samples": (1, None, "[", "]"),
    "data.sources.max_samples": (1, None, "[", "]"),
    "data.sources.weight": (0, None, "(", "]"),
    "peft.r": (1, None, "[", "]"),
    "peft.lora_alpha": (0, None, "(", "]"),
    "peft.lora_dropout": (0, 1, "[", ")"),
    # Feature sections: what each section's own checks leave open.
    "loss.gamma": (0, None, "[", "]"),
    "loss.power": (0, None, "[", "]"),
    "loss.top_fraction": (0, 1, "(", "]"),
    "loss.clamp_min": (0, None, "[", "]"),
    "loss.clamp_max": (0, None, "(", "]"),
    "loss.chunk_size": (1, None, "[", "]"),
    "loss.z_loss": (0, None, "[", "]"),
    "loss.label_smoothing": (0, 1, "[", ")"),
    "monitor.explode_factor": (1, None, "(", "]"),
    "monitor.vanish_factor": (0, 1, "(", ")"),
    "monitor.grad_norm_max": (0, None, "(", "]"),
    "monitor.grad_norm_min": (0, None, "[", "]"),
    "monitor.spike_zscore": (0, None, "(", "]"),
    "monitor.peak_flops": (0, None, "(", "]"),
    "monitor.detail_every": (1, None, "[", "]"),
    "autotune.max_eval_batch": (1, None, "[", "]"),
    "freeze.seed": (0, 2**32 - 1, "[", "]"),
}
_INT64 = 2**63 - 1


def out_of_range(key: str, value: Any) -> str | None:
    """Why a value is not allowed for ``key`` (a dotted preset key), or None when it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    if isinstance(value, int) and abs(value) > _INT64:
        return f"expected a number that fits in 64 bits, got {shown(value)}"
    if key == "training.max_steps":
        return None if value == -1 or value >= 1 else f"expected -1 (use epochs) or >= 1, got {value!r}"
    low, high, left, right = RANGES.get(unindexed(key), (None, None, "[", "]"))
    below = low is not None and (value <= low if left == "(" else value < low)
    above = high is not None and (value >= high if right == ")" else value > high)
    if below or above:
        lo = "-inf" if low is None else low
        hi, right = ("inf", ")") if high is None else (high, right)
        return f"expected a value in {left}{lo}, {hi}{right}, got {shown(value)}"
    return None


def unindexed(key: str) -> str:
    """``data.sources[1].weight`` -> ``data.sources.weight``: list items share their rules."""
    return re.sub(r"\[\d+\]", "", key)
