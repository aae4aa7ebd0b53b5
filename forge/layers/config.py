"""The ``freeze:`` preset section: static freezing, trainability schedules and LLRD in one config.

YAML example (``forge train`` maps it onto :class:`FreezeConfig` and calls :func:`from_preset`)::

    freeze:
      enabled: true
      ratio: 0.5              # bottom half of the blocks
      embeddings: true        # and the embeddings
      vision_tower: true      # vision-language models: and the vision encoder
      schedule: lisa          # null | gradual | lp_lora | lisa
      every_n_steps: 20       # LISA re-draw interval
      lisa_active_layers: 2
      layerwise_lr_decay: 0.9 # lower blocks learn more slowly

Python::

    extra = from_preset(FreezeConfig(enabled=True, first=2), model, training_args)
    Trainer(model=model, args=training_args, train_dataset=ds, **extra)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from torch import nn

from forge.core.console import note
from forge.layers.freeze import freeze_layers
from forge.layers.llrd import layerwise_lr_optimizer
from forge.layers.schedules import (
    GradualUnfreezingCallback,
    LISACallback,
    LPLoRACallback,
)

__all__ = ["FreezeConfig", "callbacks", "from_preset", "transform"]

logger = logging.getLogger(__name__)

SCHEDULES = ("gradual", "lp_lora", "lisa")


@dataclass
class FreezeConfig:
    """Preset section ``freeze:`` (see :mod:`forge.layers.config` for a YAML example).

    Example::

        cfg = FreezeConfig(enabled=True, indices=[0, 1, -1], head=False)
        cfg.validate()
    """

    enabled: bool = field(default=False, metadata={"help": "Apply the freezing below (off: nothing changes)."})
    ratio: float | None = field(
        default=None, metadata={"help": "Freeze the bottom floor(ratio * num_blocks) blocks, 0..1."}
    )
    first: int | None = field(default=None, metadata={"help": "Freeze the first (input-side) N blocks."})
    last: int | None = field(default=None, metadata={"help": "Freeze the last (output-side) N blocks."})
    indices: list[int] | None = field(
        default=None, metadata={"help": "Freeze these blocks; negative counts from the top, middle ones allowed."}
    )
    pattern: str | None = field(
        default=None, metadata={"help": "Also freeze parameters whose name matches this regex (re.search)."}
    )
    embeddings: bool | None = field(
        default=None, metadata={"help": "true: freeze the embeddings; false: make them trainable; null: leave."}
    )
    head: bool | None = field(
        default=None, metadata={"help": "true: freeze the output head; false: make it trainable; null: leave."}
    )
    vision_tower: bool | None = field(
        default=None,
        metadata={"help": "Vision-language models: true freezes the vision encoder, false makes it "
                  "trainable, null leaves it (the blocks above are the language model's)."},
    )
    schedule: Literal["gradual", "lp_lora", "lisa"] | None = field(
        default=None,
        metadata={
            "help": "Trainability schedule: gradual (top-down unfreezing), lp_lora (head first, then "
            "adapters), lisa (random active blocks); null for none."
        },
    )
    every_n_steps: int | None = field(
        default=None,
        metadata={
            "help": "Schedule period in optimizer steps: gradual = steps per stage, lp_lora = probe "
            "length, lisa = steps between re-draws."
        },
    )
    every_n_epochs: int | None = field(
        default=None, metadata={"help": "Schedule period in epochs instead of steps (set one of the two)."}
    )
    blocks_per_stage: int = field(default=1, metadata={"help": "gradual: blocks unfrozen at each stage."})
    unfreeze_embeddings: bool = field(
        default=True, metadata={"help": "gradual: let the embeddings join after the last block."}
    )
    train_head_after_probe: bool = field(
        default=True, metadata={"help": "lp_lora: keep training the head once the adapters start."}
    )
    lisa_active_layers: int = field(default=2, metadata={"help": "lisa: blocks trainable at a time."})
    seed: int | None = field(
        default=None, metadata={"help": "lisa: seed of the block draws (default: TrainingArguments.seed)."}
    )
    reset_optimizer_state: bool | None = field(
        default=None,
        metadata={
            "help": "Drop a parameter's optimizer state when a schedule freezes it (default: true for "
            "lisa and lp_lora)."
        },
    )
    layerwise_lr_decay: float | None = field(
        default=None,
        metadata={"help": "Layer-wise LR decay factor in (0, 1]: block i trains at lr * decay^(n - i)."},
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; all problems are reported in one error.

        Raises:
            ValueError: listing each invalid field.
        """
        errors = []
        if self.ratio is not None and not 0.0 <= self.ratio <= 1.0:
            errors.append(f"ratio must be in [0, 1], got {self.ratio}")
        for name in ("first", "last"):
            value = getattr(self, name)
            if value is not None and value < 0:
                errors.append(f"{name} must be >= 0, got {value}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            errors.append(f"schedule must be one of {SCHEDULES} or null, got {self.schedule!r}")
        if self.schedule is not None and (self.every_n_steps is None) == (self.every_n_epochs is None):
            errors.append(f"schedule {self.schedule!r} needs exactly one of every_n_steps / every_n_epochs")
        for name in ("every_n_steps", "every_n_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.append(f"{name} must be >= 1, got {value}")
        if self.blocks_per_stage < 1:
            errors.append(f"blocks_per_stage must be >= 1, got {self.blocks_per_stage}")
        if self.lisa_active_layers < 1:
            errors.append(f"lisa_active_layers must be >= 1, got {self.lisa_active_layers}")
        if self.layerwise_lr_decay is not None and not 0.0 < self.layerwise_lr_decay <= 1.0:
            errors.append(f"layerwise_lr_decay must be in (0, 1], got {self.layerwise_lr_decay}")
        if errors:
            raise ValueError("invalid freeze config:\n  " + "\n  ".join(errors))

    def has_static_freezing(self) -> bool:
        """True if any of ratio/first/last/indices/pattern/embeddings/head/vision_tower is set."""
        static = ("ratio", "first", "last", "indices", "pattern", "embeddings", "head", "vision_tower")
        return any(getattr(self, f.name) is not None for f in fields(self) if f.name in static)


def _schedule_callback(cfg: FreezeConfig, model: nn.Module, training_args: Any) -> Any:
    period = {"every_n_steps": cfg.every_n_steps, "every_n_epochs": cfg.every_n_epochs}
    reset = {} if cfg.reset_optimizer_state is None else {"reset_optimizer_state": cfg.reset_optimizer_state}
    if cfg.schedule == "gradual":
        return GradualUnfreezingCallback(
            model,
            **period,
            blocks_per_stage=cfg.blocks_per_stage,
            unfreeze_embeddings=cfg.unfreeze_embeddings,
            **reset,
        )
    if cfg.schedule == "lp_lora":
        return LPLoRACallback(
            model,
            probe_steps=cfg.every_n_steps,
            probe_epochs=cfg.every_n_epochs,
            train_head_after_probe=cfg.train_head_after_probe,
            **reset,
        )
    seed = cfg.seed if cfg.seed is not None else int(getattr(training_args, "seed", 0))
    return LISACallback(model, active_layers=cfg.lisa_active_layers, seed=seed, **period, **reset)


def transform(cfg: FreezeConfig, model: nn.Module, training_args: Any) -> dict[str, Any]:
    """Phase 1 (model transforms): static freezing, in place, and layer-wise LR decay.

    Returns ``{"optimizer_cls_and_kwargs": (LayerwiseLRDecayFactory, kwargs)}`` for LLRD (which
    transformers 5 calls as an optimizer factory with the model when it builds the optimizer),
    else ``{}``.

    Example::

        transform(FreezeConfig(enabled=True, ratio=0.5), model, args)   # bottom half frozen
    """
    cfg.validate()
    if not cfg.enabled:
        return {}
    extra: dict[str, Any] = {}
    if cfg.has_static_freezing():
        report = freeze_layers(
            model,
            ratio=cfg.ratio,
            first=cfg.first,
            last=cfg.last,
            indices=cfg.indices,
            pattern=cfg.pattern,
            embeddings=cfg.embeddings,
            head=cfg.head,
            vision_tower=cfg.vision_tower,
        )
        logger.info("freeze: static freezing applied\n%s", report)
        frozen = [p for p in report.frozen_parts() if p.startswith("block.")]
        others = [p for p in report.frozen_parts() if not p.startswith("block.")]
        blocks = sum(1 for r in report.rows if r[0].startswith("block."))
        extra_parts = f" and {', '.join(others)}" if others else ""
        note(f"freeze: {len(frozen)} of {blocks} blocks frozen{extra_parts}; "
             f"{report.trainable:,} of {report.total:,} parameters train")
    if cfg.layerwise_lr_decay is not None:
        extra["optimizer_cls_and_kwargs"] = layerwise_lr_optimizer(training_args, cfg.layerwise_lr_decay)
        note(f"freeze: layer-wise LR decay {cfg.layerwise_lr_decay} per block, from the head down")
    return extra


def callbacks(cfg: FreezeConfig, model: nn.Module, training_args: Any) -> dict[str, Any]:
    """Phase 3 (trainer callbacks): the trainability schedule, bound to ``model`` (so create the
    Trainer with this same model). Binding declares every parameter the schedule will ever
    train to the model's trainable set, so EMA and the monitor cover them from the start.

    Example::

        callbacks(FreezeConfig(enabled=True, schedule="lisa", every_n_steps=10), model, args)
    """
    if not cfg.enabled or cfg.schedule is None:
        return {}
    callback = _schedule_callback(cfg, model, training_args)
    period = f"every {cfg.every_n_steps} steps" if cfg.every_n_steps else f"every {cfg.every_n_epochs} epochs"
    note(f"freeze: schedule {cfg.schedule}, {period}, over {len(callback.managed)} parameter tensors")
    return {"callbacks": [callback]}


def from_preset(cfg: FreezeConfig, model: nn.Module, training_args: Any) -> dict[str, Any]:
    """Both phases at once: :func:`transform` then :func:`callbacks`, for plain HF code.

    Args:
        cfg: the ``freeze:`` section.
        model: plain or PEFT-wrapped model, before the Trainer is created.
        training_args: the run's ``TrainingArguments`` (lr, weight decay, optim, seed).

    Returns:
        A dict to splat into ``Trainer(...)``; empty when ``cfg.enabled`` is false.

    Raises:
        ValueError: invalid config or a selection the model cannot satisfy.

    Example::

        extra = from_preset(FreezeConfig(enabled=True, schedule="lisa", every_n_steps=10), model, args)
        trainer = Trainer(model=model, args=args, train_dataset=ds, **extra)
    """
    return {**transform(cfg, model, training_args), **callbacks(cfg, model, training_args)}
