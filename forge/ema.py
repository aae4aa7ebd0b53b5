"""Exponential moving average (EMA) of model weights: a core object and a Trainer callback.

Plain PyTorch::

    ema = EMAWeights(model, decay=0.999)      # after model.to(device), before or after DDP
    for batch in loader:
        loss(model, batch).backward(); opt.step(); opt.zero_grad()
        ema.update(model)
    with ema.apply_to(model):                  # EMA weights in, raw weights back out
        evaluate(model)

HF Trainer (also TRL trainers)::

    trainer = Trainer(model, args, ..., callbacks=[EMACallback(decay=0.999, eval_with_ema=True)])

See ``docs/ema.md`` for choosing ``decay``, memory cost and the distributed story.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from forge._ema_callback import EMA_WEIGHTS_NAME, EMACallback
from forge._ema_core import EMAWeights
from forge._ema_schedule import DTYPES, SCHEDULE_KEYS, check_settings

__all__ = ["EMA_WEIGHTS_NAME", "EMACallback", "EMAConfig", "EMAWeights", "from_preset"]

# The classes live in private modules to keep each file to one concept; they are documented here.
EMAWeights.__module__ = EMACallback.__module__ = __name__

logger = logging.getLogger(__name__)


@dataclass
class EMAConfig:
    """The ``ema:`` section of a forge preset; :func:`from_preset` turns it into a callback.

    Example:
        >>> EMAConfig(enabled=True, decay=0.998).update_every
        1
    """

    enabled: bool = field(default=False, metadata={"help": "Keep an EMA of the trainable weights."})
    decay: float = field(default=0.999, metadata={"help": "Old-average weight per step; averages ~1/(1-decay) steps."})
    update_every: int = field(default=1, metadata={"help": "Average every k optimizer steps (decay**k compensates)."})
    update_after_step: int = field(
        default=0, metadata={"help": "Copy the weights instead of averaging for this many steps."}
    )
    warmup: str | None = field(
        default=None, metadata={"help": "None (fixed decay), 'hyperbolic' ((1+u)/(10+u)) or 'power'."}
    )
    inv_gamma: float = field(default=1.0, metadata={"help": "Time scale of the 'power' warm-up."})
    power: float = field(
        default=2 / 3, metadata={"help": "Exponent of the 'power' warm-up (2/3 long, 3/4 short runs)."}
    )
    min_decay: float = field(default=0.0, metadata={"help": "Lower clamp of the warm-up decay."})
    include_frozen: bool = field(
        default=False, metadata={"help": "Also average frozen parameters (e.g. the base model under LoRA)."}
    )
    include_buffers: bool = field(default=False, metadata={"help": "Also track buffers (e.g. BatchNorm statistics)."})
    device: str | None = field(
        default=None, metadata={"help": "Where the EMA lives: null = next to the weights, 'cpu' spares GPU memory."}
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "EMA storage dtype: float32 (keep it for bf16/fp16 models), bfloat16, ..., auto."},
    )
    eval_with_ema: bool = field(
        default=False, metadata={"help": "Also evaluate with the EMA weights; logs eval_ema_loss etc."}
    )
    save_ema_model: bool = field(
        default=False, metadata={"help": "Save the EMA weights as the final model (adapter for PEFT) in output_dir."}
    )

    def __post_init__(self) -> None:
        errors = check_settings(**{k: getattr(self, k) for k in SCHEDULE_KEYS})
        if self.dtype not in DTYPES:
            errors.append(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if errors:
            raise ValueError("ema: " + "; ".join(errors))


def from_preset(cfg: EMAConfig, model: nn.Module | None, training_args: Any) -> dict[str, Any]:
    """Extra ``Trainer`` keyword arguments for a preset's ``ema:`` section.

    Args:
        cfg: the validated section.
        model: the model to be trained, used only to fail early when it has nothing to average.
        training_args: the run's ``TrainingArguments`` (its ``resume_from_checkpoint`` is used).

    Returns:
        ``{"callbacks": [EMACallback(...)]}`` when enabled, else ``{}``.

    Raises:
        ValueError: when enabled on a model without trainable floating-point parameters.

    Example:
        >>> from_preset(EMAConfig(), None, None)
        {}
    """
    if not cfg.enabled:
        return {}
    if model is not None and not any(
        p.is_floating_point() and (p.requires_grad or cfg.include_frozen) for p in model.parameters()
    ):
        raise ValueError("ema.enabled: the model has no trainable floating-point parameters to average")
    strategy = getattr(training_args, "eval_strategy", "no")
    if cfg.eval_with_ema and getattr(strategy, "value", strategy) == "no":
        logger.warning("ema.eval_with_ema has no effect: evaluation is off (eval_strategy='no').")
    resume = getattr(training_args, "resume_from_checkpoint", None)
    callback = EMACallback(
        **{k: getattr(cfg, k) for k in SCHEDULE_KEYS},
        include_frozen=cfg.include_frozen,
        include_buffers=cfg.include_buffers,
        device=cfg.device,
        dtype=cfg.dtype,
        eval_with_ema=cfg.eval_with_ema,
        save_ema_model=cfg.save_ema_model,
        resume_from_checkpoint=resume if isinstance(resume, str) else None,
    )
    return {"callbacks": [callback]}
