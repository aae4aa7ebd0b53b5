"""Memory-saving forward for causal LMs: decoder to hidden states, LM head applied by the fused loss.

:func:`use_fused_lm_head` replaces ``model.forward`` on the instance (PEFT wrappers call it, TRL
wraps it again) so that, while training with gradients enabled, the model returns its last hidden
state and a reference to its own LM head instead of ``[batch, seq, vocab]`` logits.
:class:`~forge.loss.AdaptiveLoss` (as ``compute_loss_func``, or attached to the model when the
forward receives ``labels``) then applies the head chunk by chunk. Evaluation, generation and
anything under ``torch.no_grad()`` run the original forward unchanged.

TRL's ``SFTTrainer`` with a ``compute_loss_func`` calls the model a second time, without gradients
and with its own fused head, only to log token accuracy and entropy. The decoder output of the
patched forward is kept for that one call (matched by the identity of the input tensors and
consumed once), so the second call costs an LM head pass but not another decoder forward.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

# Batch keys the patched forward takes out of the model inputs and hands to the loss.
EXTRA_KEYS: tuple[str, ...] = ("loss_weights", "completion_mask")
_PATCH_ATTR = "_forge_fused_forward"


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (the one whose forward runs the backbone)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) and hasattr(model, "peft_config") else model


def _plain_head(head: torch.nn.Module | None) -> torch.nn.Linear | None:
    """The ``nn.Linear`` to fuse, through PEFT ``modules_to_save``; None where fusing would be wrong.

    A LoRA adapter on the head itself (or a quantised head) changes what ``head(x)`` computes
    beyond ``x @ weight.T + bias``; those fall back to the original forward.
    """
    if head is None:
        return None
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        if head.disable_adapters or not isinstance(head.active_adapter, str):
            return _plain_head(head.original_module)
        return _plain_head(head.modules_to_save[head.active_adapter])
    if type(head) is torch.nn.Linear and head.weight.dtype.is_floating_point:
        return head
    return None


def _logit_transform(config: Any) -> tuple[float | None, float]:
    """(softcap, scale) the model's own forward applies to the LM head output (Gemma 2, Cohere, Granite...)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None):
        scale = 1.0 / text.logits_scaling
    return softcap, float(1.0 if scale is None else scale)


def _call_key(args: tuple, kwargs: dict) -> tuple:
    """What identifies a decoder call: its inputs, minus forge's batch keys and explicit Nones."""
    return args, {k: v for k, v in kwargs.items() if v is not None and k not in EXTRA_KEYS}


def _same_call(cached: tuple, key: tuple) -> bool:
    """Whether two call keys match: tensors by identity, everything else by value."""
    (c_args, c_kwargs), (args, kwargs) = cached, key
    if len(args) != len(c_args) or set(kwargs) != set(c_kwargs):
        return False
    pairs = list(zip(args, c_args)) + [(kwargs[k], c_kwargs[k]) for k in c_kwargs]
    return all(a is b if torch.is_tensor(a) or torch.is_tensor(b) else a == b for a, b in pairs)


def _witness(module: torch.nn.Module) -> tuple[int, int] | None:
    """Identity and in-place version counter of the first trainable parameter (an optimizer step bumps it)."""
    p = next((p for p in module.parameters() if p.requires_grad), None)
    return None if p is None else (id(p), p._version)


def _wrap_backbone(target: torch.nn.Module, backbone: torch.nn.Module) -> None:
    """Let one no-grad decoder call with the same inputs reuse the previous call's output.

    Only outputs computed inside the patched model forward are kept, and one is served at most
    once, to the very next decoder call, and only to a call made directly on the decoder (not
    through the model's forward, which is how TRL's fused head calls it right after the loss), in
    the same train/eval mode, without gradients, with the same input tensor objects, and with the
    trainable parameters unchanged (their version counter), so nothing stale is ever served.
    """
    if getattr(backbone, "_forge_reuse", False):
        return
    previous = backbone.forward

    @functools.wraps(type(backbone).forward)
    def forward(self, *args, **kwargs):
        for k in EXTRA_KEYS:  # TRL's fused head passes every batch key on to the decoder
            kwargs.pop(k, None)
        key = _call_key(args, kwargs)
        cache, target._forge_decoder_cache = target._forge_decoder_cache, None
        direct = not target._forge_in_forward
        reusable = cache is not None and direct and not torch.is_grad_enabled() and cache[2] == self.training
        if reusable and cache[3] == _witness(self) and _same_call(cache[0], key):
            return cache[1]
        out = previous(*args, **kwargs)
        if not direct and hasattr(out, "items"):
            # Detached: the reusing call runs under no_grad and must not hold the graph.
            reuse = type(out)(**{k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()})
            target._forge_decoder_cache = (key, reuse, self.training, _witness(self))
        return out

    backbone.forward = types.MethodType(forward, backbone)
    backbone._forge_reuse = True


def use_fused_lm_head(
    model: torch.nn.Module,
    loss: Callable | None = None,
    extra_keys: Sequence[str] = EXTRA_KEYS,
    fused: bool = True,
) -> torch.nn.Module:
    """Make ``model`` return hidden states for the fused loss while training; returns ``model``.

    Call it on the plain model or its PEFT wrapper, before or after wrapping with PEFT and before or
    after building a TRL trainer. While ``model.training`` and gradients are enabled, the forward
    runs the decoder only and returns a ``CausalLMOutputWithPast`` with ``logits=None`` plus the keys
    ``last_hidden_state``, ``lm_head`` (the model's own head module, tied or not), ``logit_softcap``,
    ``logit_scale`` and ``loss_extras``. If ``labels`` are passed, ``loss`` (an
    :class:`~forge.loss.AdaptiveLoss`; plain cross-entropy when None) fills ``outputs.loss`` using
    ``num_items_in_batch``. Batch keys in ``extra_keys`` (per-token weights, completion masks) are
    removed from the model inputs and passed to the loss in every mode.

    Args:
        model: A causal LM (``PreTrainedModel`` with ``get_output_embeddings``) or a PEFT model.
        loss: Loss used when the forward receives ``labels``.
        extra_keys: Batch keys to route to the loss instead of the model.
        fused: False keeps the full logits and only routes ``extra_keys`` (for unfused runs that
            still need per-example weights or completion masks).

    Returns:
        The same model, patched in place (idempotent; :func:`restore_lm_head` undoes it).

    Example:
        >>> model = use_fused_lm_head(model)
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, compute_loss_func=AdaptiveLoss())
    """
    target = _base_model(model)
    if getattr(target, _PATCH_ATTR, None) is not None:
        target._forge_loss = loss if loss is not None else target._forge_loss
        target._forge_fused = fused
        return model
    previous = target.forward
    softcap, scale = _logit_transform(target.config)
    keys = tuple(extra_keys)
    warned: list[bool] = []

    @functools.wraps(type(target).forward)
    def forward(self, *args, **kwargs):
        self._forge_in_forward = True
        try:
            return _forward(self, *args, **kwargs)
        finally:
            self._forge_in_forward = False

    def _forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
        extras = {k: kwargs.pop(k) for k in keys if k in kwargs}
        # TRL's own fused head (`fused_lm_head=True`) and non-training calls take the original path.
        head = _plain_head(self.get_output_embeddings())
        fuse = self._forge_fused and self.training and torch.is_grad_enabled() and not kwargs.get("fused_lm_head")
        if fuse and head is None and not warned:
            warned.append(True)
            warnings.warn("use_fused_lm_head: the LM head is adapted or quantised; using the full logits", stacklevel=2)
        if self.base_model is not self:
            _wrap_backbone(self, self.base_model)
        if not fuse or head is None:
            if labels is not None:
                kwargs["labels"] = labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            out = previous(*args, **kwargs)
            if extras:
                # An attribute, not a key: the Trainer turns every output key into "logits" in eval.
                out.loss_extras = extras
            return out

        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        backbone = self.base_model
        if backbone is self:
            raise TypeError(f"use_fused_lm_head: {type(self).__name__} has no separate decoder (base_model)")
        hidden = backbone(*args, **kwargs)
        fused_keys = {
            "last_hidden_state": hidden.last_hidden_state,
            "lm_head": head,
            "logit_softcap": softcap,
            "logit_scale": scale,
            "loss_extras": extras,
        }
        loss = None
        if labels is not None:
            from forge.loss import AdaptiveLoss

            loss = (self._forge_loss or AdaptiveLoss())(fused_keys, labels, num_items_in_batch=num_items_in_batch)
        out = CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            past_key_values=getattr(hidden, "past_key_values", None),
            hidden_states=getattr(hidden, "hidden_states", None),
            attentions=getattr(hidden, "attentions", None),
        )
        # Keys, not attributes: accelerate's fp32 output conversion rebuilds the output from its keys.
        for k, v in fused_keys.items():
            out[k] = v
        return out

    target._forge_previous_forward = previous
    target._forge_decoder_cache = None
    target._forge_in_forward = False
    target._forge_loss = loss
    target._forge_fused = fused
    target.forward = types.MethodType(forward, target)
    setattr(target, _PATCH_ATTR, target.forward)
    return model


def restore_lm_head(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`use_fused_lm_head` (if a later wrapper patched on top, it stays in place).

    Example:
        >>> model = restore_lm_head(use_fused_lm_head(model))
    """
    target = _base_model(model)
    patched = getattr(target, _PATCH_ATTR, None)
    if patched is None:
        return model
    if target.forward == patched:
        target.forward = target._forge_previous_forward
        if target.forward == types.MethodType(type(target).forward, target):
            del target.forward
    setattr(target, _PATCH_ATTR, None)
    backbone = target.base_model
    if getattr(backbone, "_forge_reuse", False):
        del backbone.forward
        backbone._forge_reuse = False
    return model


class ExampleWeightCollator:
    """Wrap a data collator to carry a per-example weight column as per-token ``loss_weights``.

    The weights are expanded along each example's tokens (also for padding-free batches, where the
    examples are concatenated into one row), aligned with ``labels`` before the causal shift. The
    patched forward removes the key from the model inputs and hands it to the loss. Keep the column
    in the dataset: set ``remove_unused_columns=False`` in the training arguments.

    Args:
        collator: The collator to wrap (e.g. TRL's ``DataCollatorForLanguageModeling``).
        column: Dataset column holding one float per example.
        key: Batch key for the weights, read by :func:`~forge.loss.example_weights`.

    Example:
        >>> collator = ExampleWeightCollator(DataCollatorForLanguageModeling(pad_token_id=0), "weight")
    """

    def __init__(self, collator: Callable, column: str = "weight", key: str = "loss_weights"):
        self.collator = collator
        self.column = column
        self.key = key

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if examples and self.column not in examples[0]:
            raise KeyError(
                f"ExampleWeightCollator: examples have no {self.column!r} column (set remove_unused_columns=False)"
            )
        weights = torch.tensor([float(ex[self.column]) for ex in examples])
        batch = self.collator([{k: v for k, v in ex.items() if k != self.column} for ex in examples])
        labels = batch["labels"]
        if labels.shape[0] == len(examples):
            batch[self.key] = weights[:, None].expand(labels.shape).contiguous()
        else:  # padding-free: one row holding every example in order
            lengths = torch.tensor([len(ex["input_ids"]) for ex in examples])
            row = torch.repeat_interleave(weights, lengths)
            out = torch.zeros(labels.shape)
            out[0, : row.numel()] = row[: labels.shape[1]]
            batch[self.key] = out
        return batch
