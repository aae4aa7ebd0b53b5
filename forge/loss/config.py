"""The ``loss:`` preset section: :class:`LossConfig` and the trainer arguments it becomes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from forge.core.console import note
from forge.core.hooks import ARGS, apply_arg_updates
from forge.loss.adaptive import AdaptiveLoss
from forge.loss.collators import ExampleWeightCollator, ResponseOnlyCollator
from forge.loss.patch import use_fused_lm_head
from forge.loss.strategies import (
    STRATEGIES,
    TokenWeighting,
    dft,
    entropy,
    example_weights,
    focal,
    hard_tokens,
    response_only,
)

__all__ = ["LossConfig", "from_preset", "transform"]


@dataclass
class LossConfig:
    """The ``loss:`` section of a forge preset.

    Example:
        >>> cfg = LossConfig(strategy="focal", gamma=2.0, z_loss=1e-4)
        >>> kwargs = from_preset(cfg, model, training_args)   # {"callbacks": [LossCallback(...)]}
    """

    strategy: str | None = field(
        default=None,
        metadata={"help": f"Token weighting: one of {sorted(STRATEGIES)}, or null for plain cross-entropy."},
    )
    gamma: float = field(default=2.0, metadata={"help": "focal: exponent of (1 - p); 0 is plain cross-entropy."})
    power: float = field(default=1.0, metadata={"help": "entropy: exponent applied to the entropy weight."})
    top_fraction: float = field(
        default=0.2, metadata={"help": "hard_tokens: fraction of highest-loss tokens trained on, per micro-batch."}
    )
    response_template: list[int] | None = field(
        default=None,
        metadata={
            "help": "response_only: token ids that open a response (masked in the collator); null relies on the "
            "trainer's prompt masking."
        },
    )
    instruction_template: list[int] | None = field(
        default=None, metadata={"help": "response_only: token ids that open a user turn (ends a response span)."}
    )
    weight_column: str | None = field(
        default=None,
        metadata={
            "help": "Dataset column of per-example weights, multiplied into any strategy (needs fused or a patch)."
        },
    )
    clamp_min: float | None = field(default=None, metadata={"help": "Lower bound on the per-token weights."})
    clamp_max: float | None = field(default=None, metadata={"help": "Upper bound on the per-token weights."})
    normalize: bool | None = field(
        default=None,
        metadata={
            "help": "Rescale weights to mean one per micro-batch; null = strategy default (entropy, hard_tokens)."
        },
    )
    fused: bool = field(
        default=True,
        metadata={"help": "Run the decoder to hidden states and apply the LM head chunk by chunk (saves the logits)."},
    )
    chunk_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per chunk of the fused kernel; null keeps a chunk's logits near 32 MiB."},
    )
    z_loss: float = field(default=0.0, metadata={"help": "Coefficient of logsumexp(logits)^2 (PaLM uses 1e-4)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing, as in torch cross_entropy."})

    def build(self) -> AdaptiveLoss:
        """The :class:`AdaptiveLoss` this section describes.

        Prompt masking is not part of it: :func:`transform` masks the labels in the collator
        (:class:`ResponseOnlyCollator`), so that the Trainer's token count sees the mask too.
        """
        strategies: list[TokenWeighting] = []
        params = {
            "focal": lambda: focal(self.gamma),
            "dft": dft,
            "entropy": lambda: entropy(self.power),
            "hard_tokens": lambda: hard_tokens(self.top_fraction),
            "response_only": lambda: response_only(self.response_template, self.instruction_template),
            "example_weights": example_weights,
        }
        if self.strategy is not None:
            if self.strategy not in params:
                raise ValueError(f"loss.strategy: unknown {self.strategy!r}; choose from {sorted(params)}")
            if self.strategy != "response_only":
                strategies.append(params[self.strategy]())
        if self.weight_column is not None and self.strategy != "example_weights":
            strategies.append(example_weights())
        return AdaptiveLoss(
            strategies,
            normalize=self.normalize,
            clamp_min=self.clamp_min,
            clamp_max=self.clamp_max,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            chunk_size=self.chunk_size,
        )


def transform(cfg: LossConfig, model: torch.nn.Module, training_args: Any) -> dict[str, Any]:
    """Phase 1 (model transforms) of a preset's ``loss:`` section; patches ``model`` in place.

    Returns ``{}`` for plain, unfused cross-entropy. Otherwise the model (or the model inside a
    PEFT wrapper) gets :func:`use_fused_lm_head`, so its forward computes the loss in the one
    decoder pass the trainer makes, and the result is ``{"callbacks": [LossCallback]}``, plus a
    ``data_collator`` when the labels need masking (``response_template``) or the batch needs a
    weight column (``weight_column``, with ``remove_unused_columns=False`` under ``"args"``).

    Args:
        cfg: The validated section.
        model: The model the trainer will train (plain or PEFT).
        training_args: ``TrainingArguments`` / ``SFTConfig`` the trainer will get.

    Returns:
        Extra keyword arguments for ``SFTTrainer(...)`` or ``Trainer(...)``.

    Raises:
        ValueError: If the training arguments ask for a loss this section would silently override.

    Example:
        >>> trainer = SFTTrainer(model=model, args=args, train_dataset=ds, **from_preset(cfg, model, args))
    """
    plain = (
        cfg.strategy is None
        and not cfg.fused
        and not cfg.z_loss
        and not cfg.label_smoothing
        and cfg.weight_column is None
    )
    if plain:
        return {}
    if getattr(training_args, "loss_type", "nll") not in ("nll", None):
        raise ValueError(f"loss: SFTConfig.loss_type={training_args.loss_type!r} conflicts; use loss.strategy instead")
    if getattr(training_args, "label_smoothing_factor", 0.0):
        raise ValueError("loss: set loss.label_smoothing instead of label_smoothing_factor in the training arguments")
    loss_fn = cfg.build()
    kwargs: dict[str, Any] = {"callbacks": [loss_fn.callback()]}
    what = cfg.strategy or "plain cross-entropy"
    extras = [f"{k} {getattr(cfg, k)}" for k in ("z_loss", "label_smoothing") if getattr(cfg, k)]
    path = "the fused chunked LM head (no full logits)" if cfg.fused else "the model's logits"
    note(f"loss: {what}{' with ' + ', '.join(extras) if extras else ''} on {path}")
    use_fused_lm_head(model, loss=loss_fn, fused=cfg.fused)
    mask = cfg.strategy == "response_only" and cfg.response_template is not None
    if mask or cfg.weight_column is not None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        config = _base_model_config(model)
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            eos = getattr(config, "eos_token_id", None)
            pad = (eos[0] if isinstance(eos, list) else eos) or 0
        collator: Any = DataCollatorForLanguageModeling(
            pad_token_id=pad,
            padding_free=bool(getattr(training_args, "padding_free", False)),
            pad_to_multiple_of=getattr(training_args, "pad_to_multiple_of", None),
        )
        if mask:
            collator = ResponseOnlyCollator(collator, cfg.response_template, cfg.instruction_template)
        if cfg.weight_column is not None:
            collator = ExampleWeightCollator(collator, cfg.weight_column)
            kwargs[ARGS] = {"remove_unused_columns": False}
        kwargs["data_collator"] = collator
    return kwargs


def from_preset(cfg: LossConfig, model: torch.nn.Module, training_args: Any) -> dict[str, Any]:
    """:func:`transform`, with its training-argument changes applied, for plain HF code.

    Example:
        >>> trainer = SFTTrainer(model=model, args=args, train_dataset=ds, **from_preset(cfg, model, args))
    """
    return apply_arg_updates(training_args, transform(cfg, model, training_args))


def _base_model_config(model: torch.nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config
