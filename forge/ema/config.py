"""The ``ema:`` preset section: :class:`EMAConfig` and the callback it becomes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from forge.ema.callback import EMACallback
from forge.ema.schedule import DTYPES, SCHEDULE_KEYS, check_settings

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


def reserved_bytes(cfg: EMAConfig, model: nn.Module) -> int:
    """Memory the EMA will hold on the training device, for autotune's budget (0 off-device).

    The shadow copy of every tensor the EMA tracks (see :func:`forge.ema.plan.tracked_tensors`),
    in its storage dtype; with ``device: cpu`` it lives in host memory and costs the
    accelerator nothing, except on a CPU-only run where host memory is the budget.

    Example:
        >>> reserved_bytes(EMAConfig(enabled=True), torch.nn.Linear(4, 4))
        80
    """
    import torch

    from forge.ema.plan import tracked_tensors
    from forge.ema.schedule import as_dtype

    if not cfg.enabled:
        return 0
    tensors = [t for _, t in tracked_tensors(model, cfg.include_frozen, cfg.include_buffers)]
    if cfg.device is not None and tensors and torch.device(cfg.device).type != tensors[0].device.type:
        return 0
    dtype = as_dtype(cfg.dtype)
    return sum(t.numel() * (torch.empty((), dtype=dtype).element_size()
                            if dtype is not None and t.is_floating_point() else t.element_size())
               for t in tensors)
