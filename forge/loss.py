"""Adaptive token-level loss on a fused, chunked linear + cross-entropy.

Two ways in, on an unchanged ``transformers.Trainer`` or TRL ``SFTTrainer``::

    from forge.loss import AdaptiveLoss, focal, use_fused_lm_head

    loss_fn = AdaptiveLoss(strategy=focal(2.0), z_loss=1e-4)
    use_fused_lm_head(model)            # optional: never build the [batch, seq, vocab] logits
    trainer = Trainer(model=model, args=args, train_dataset=ds, compute_loss_func=loss_fn)

Without :func:`use_fused_lm_head` the same loss runs on the model's logits. With it, the model
returns its last hidden state and :func:`fused_linear_cross_entropy` applies the model's own LM head
chunk by chunk, computing the gradients in the forward pass. See ``docs/loss.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from forge._console import note
from forge._loss_adaptive import AdaptiveLoss
from forge._loss_patch import ExampleWeightCollator, restore_lm_head, use_fused_lm_head
from forge._loss_strategies import (
    STRATEGIES,
    TokenWeighting,
    custom,
    dft,
    entropy,
    example_weights,
    focal,
    hard_tokens,
    response_only,
)
from forge.kernels.chunked import CEOptions, chunked_linear_cross_entropy

__all__ = [
    "AdaptiveLoss",
    "ExampleWeightCollator",
    "LossConfig",
    "TokenWeighting",
    "custom",
    "dft",
    "entropy",
    "example_weights",
    "focal",
    "from_preset",
    "fused_linear_cross_entropy",
    "hard_tokens",
    "response_only",
    "restore_lm_head",
    "use_fused_lm_head",
]


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` without materialising the logits.

    Equal to ``F.cross_entropy(logits, labels, ignore_index=..., reduction=..., label_smoothing=...)``
    on ``logits = softcap(logit_scale * (hidden @ weight.T + bias))``, plus ``z_loss * logsumexp^2`` per
    valid token, each token's term multiplied by ``token_weights``. ``"mean"`` divides by the number
    of non-ignored tokens (not by the weight sum). Gradients for ``hidden``, ``weight`` and ``bias`` are
    computed chunk by chunk in the forward pass and scaled in the backward.

    Args:
        hidden: ``[..., hidden_size]`` inputs of the LM head (any leading shape).
        weight: ``[vocab, hidden_size]`` LM head weight (tied embeddings work: pass the shared tensor).
        labels: Target ids with the leading shape of ``hidden``; ``ignore_index`` marks skipped tokens.
        bias: Optional ``[vocab]`` bias.
        token_weights: Optional fixed weights with the leading shape of ``hidden`` (no gradient).
        ignore_index: Label value that contributes nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-token losses with the leading shape).
        label_smoothing: As in ``torch.nn.functional.cross_entropy``.
        z_loss: Coefficient of the ``logsumexp(logits)^2`` regulariser (PaLM uses 1e-4).
        logit_softcap: ``c * tanh(logits / c)`` soft-capping (Gemma 2), None for none.
        logit_scale: Multiplier applied to the logits before soft-capping.
        chunk_size: Tokens per chunk; None picks one that keeps a chunk's logits near 32 MiB.

    Returns:
        The loss: a scalar, or per-token values for ``reduction="none"``.

    Example:
        >>> h = torch.randn(4, 16, 64, requires_grad=True)
        >>> W = torch.randn(1000, 64, requires_grad=True)
        >>> loss = fused_linear_cross_entropy(h, W, torch.randint(0, 1000, (4, 16)))
        >>> loss.backward()
    """
    lead = labels.shape
    opts = CEOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
    )
    tw = None if token_weights is None else token_weights.reshape(-1)
    loss = chunked_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), bias, tw, None, opts
    )[0]
    return loss.view(lead) if reduction == "none" else loss


@dataclass
class LossConfig:
    """The ``loss:`` section of a forge preset.

    Example:
        >>> cfg = LossConfig(strategy="focal", gamma=2.0, z_loss=1e-4)
        >>> kwargs = from_preset(cfg, model, training_args)   # {"compute_loss_func": AdaptiveLoss(...)}
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
            "help": "response_only: token ids that open a response; null relies on the trainer's prompt masking."
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
        """The :class:`AdaptiveLoss` this section describes."""
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
            if not (self.strategy == "response_only" and self.response_template is None):
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


def from_preset(cfg: LossConfig, model: torch.nn.Module, training_args: Any) -> dict[str, Any]:
    """Trainer keyword arguments for a preset's ``loss:`` section; may patch ``model`` in place.

    Returns ``{}`` for plain, unfused cross-entropy. Otherwise ``{"compute_loss_func": AdaptiveLoss}``,
    plus ``{"data_collator": ExampleWeightCollator(...)}`` when ``weight_column`` is set (which also sets
    ``training_args.remove_unused_columns = False`` so the column reaches the collator). With
    ``fused`` the model (or the model inside a PEFT wrapper) gets :func:`use_fused_lm_head`.

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
    kwargs: dict[str, Any] = {"compute_loss_func": loss_fn}
    what = cfg.strategy or "plain cross-entropy"
    extras = [f"{k} {getattr(cfg, k)}" for k in ("z_loss", "label_smoothing") if getattr(cfg, k)]
    path = "the fused chunked LM head (no full logits)" if cfg.fused else "the model's logits"
    note(f"loss: {what}{' with ' + ', '.join(extras) if extras else ''} on {path}")
    if cfg.fused or cfg.weight_column is not None:
        # Unfused runs still need the patch to route the weight column past the model.
        use_fused_lm_head(model, loss=loss_fn, fused=cfg.fused)
    if cfg.weight_column is not None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        config = _base_model_config(model)
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            eos = getattr(config, "eos_token_id", None)
            pad = (eos[0] if isinstance(eos, list) else eos) or 0
        base = DataCollatorForLanguageModeling(
            pad_token_id=pad,
            padding_free=bool(getattr(training_args, "padding_free", False)),
            pad_to_multiple_of=getattr(training_args, "pad_to_multiple_of", None),
        )
        kwargs["data_collator"] = ExampleWeightCollator(base, cfg.weight_column)
        training_args.remove_unused_columns = False
    return kwargs


def _base_model_config(model: torch.nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config
