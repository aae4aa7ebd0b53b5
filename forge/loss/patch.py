"""The model forward that computes forge's loss: one decoder pass per micro-batch, no logits.

:func:`use_fused_lm_head` replaces ``forward`` on the model instance (the transformers model inside
a PEFT wrapper, so ``PeftModel`` calls it). The patched forward answers the two calls a trainer
makes for its loss, with a single decoder pass each:

* ``model(**inputs, num_items_in_batch=n)`` with ``labels`` (``Trainer.compute_loss``): returns
  forge's loss in ``outputs.loss``. While training with gradients the LM head is applied chunk by
  chunk by the fused kernel (``logits=None``); otherwise (evaluation) the original forward runs
  and the loss is computed from its logits, so ``compute_metrics`` still gets them.
* a fused-head call (TRL >= 1.16: ``SFTTrainer.compute_loss`` calls ``model(**inputs,
  fused_lm_head=True)``): returns TRL's fused-head fields from the same kernel pass: ``entropy``,
  ``is_top1`` and ``label_mask`` for its metrics, and ``log_probs`` set to minus forge's per-token
  loss terms, so that TRL's ``-log_probs.sum() / num_items_in_batch`` is forge's loss (values
  exact; the gradient rides on their sum, the only thing TRL takes of them).

A call without labels (generation, feature extraction) runs the original forward unchanged.

TRL wraps the model's forward again with a fused head of its own when the ``SFTTrainer`` is
built, and accelerate wraps it once more for autocast when training starts; both stay as they
are. :func:`route_fused_head` instead wraps the trainer instance's ``compute_loss`` so that the
model TRL calls turns ``fused_lm_head=True`` into ``forge_fused_lm_head=True``: TRL's wrapper
passes that through to forge's forward, under accelerate's autocast. :class:`~forge.loss.LossCallback`
does this when the trainer is built. A decoder pass that bypasses forge's forward while training
draws a warning.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

# Batch keys the patched forward takes out of the model inputs and hands to the loss.
EXTRA_KEYS: tuple[str, ...] = ("loss_weights", "completion_mask")
# The fused-head call under the name TRL's own wrapper passes on to the forward it wraps.
HEAD_KEY = "forge_fused_lm_head"


@dataclass
class FusedLossOutput(ModelOutput):
    """What the patched forward returns for ``fused_lm_head=True``: the fields of TRL's
    ``FusedCausalLMOutput`` that ``SFTTrainer.compute_loss`` reads (per-token, ``[batch, seq - 1]``,
    zero where the label is ignored). ``log_probs`` is minus forge's per-token loss terms."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class _State:
    """What one patched model carries: the loss, the options, and whether its forward is running."""

    def __init__(self, loss: Any, fused: bool, keys: tuple[str, ...], config: Any):
        self.loss, self.fused, self.keys = loss, fused, keys
        self.softcap, self.scale = _logit_transform(config)
        self.depth = 0  # > 0 while a forge forward runs: the decoder's guard reads it
        self.active = True  # False once restored: a forward left under another wrapper passes through
        self.warned: set[str] = set()
        self.forward: Any = None  # forge's bound forward, and the one it wraps
        self.previous: Any = None
        self.hook: Any = None
        self.had_accepts_loss_kwargs: Any = None

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, stacklevel=3)


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


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _logit_transform(config: Any) -> tuple[float | None, float]:
    """(softcap, scale) the model's own forward applies to the LM head output (Gemma 2, Cohere, Granite...)."""
    text = _text_config(config)
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None):
        scale = 1.0 / text.logits_scaling
    return softcap, float(1.0 if scale is None else scale)


def _router_aux_loss(model: torch.nn.Module, backbone_out: Any, attention_mask: Any) -> torch.Tensor | None:
    """MoE load balancing loss from the decoder's router logits (as the model's own forward adds it)."""
    router_logits = getattr(backbone_out, "router_logits", None)
    if router_logits is None:
        return None
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text = _text_config(model.config)
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    return load_balancing_loss_func(router_logits, experts, text.num_experts_per_tok, attention_mask)


def _trl_outputs(terms: Any, aux_loss: torch.Tensor | None) -> FusedLossOutput:
    """TRL's fused-head fields from forge's per-token terms (see the module docstring)."""
    mask = terms.mask
    count = mask.sum().clamp(min=1)
    # Values: each token's term. Gradient: the exact total's, spread evenly over the counted tokens,
    # so that the sum (all TRL takes) has the loss's gradient; an all-masked batch stays connected.
    carried = (terms.total - terms.total.detach()) * mask / count
    return FusedLossOutput(
        loss=terms.total / count,
        log_probs=-(terms.token_loss + carried),
        entropy=terms.entropy,
        is_top1=terms.top1,
        label_mask=mask,
        aux_loss=aux_loss,
    )


def _loss_forward(self, state: _State, previous, args, kwargs, labels, num_items_in_batch, trl_call, extras):
    """The forward of a call with labels: one decoder pass, forge's loss (see the module docstring)."""
    from forge.loss.adaptive import AdaptiveLoss

    if kwargs.get("shift_labels") is not None:
        raise NotImplementedError("forge's loss does not take pre-shifted `shift_labels` (context parallelism) yet")
    loss_fn = state.loss if state.loss is not None else AdaptiveLoss()
    head = _plain_head(self.get_output_embeddings())
    if state.fused and head is None:
        state.warn_once("head", "use_fused_lm_head: the LM head is adapted or quantised; using the full logits")
    # TRL asks for per-token fields only, in training and in evaluation: never any logits then.
    fuse = state.fused and head is not None and (trl_call or (self.training and torch.is_grad_enabled()))
    if fuse:
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        backbone = self.base_model
        if backbone is self:
            raise TypeError(f"use_fused_lm_head: {type(self).__name__} has no separate decoder (base_model)")
        out = backbone(*args, **kwargs)
        source = {"last_hidden_state": out.last_hidden_state, "lm_head": head, "logit_softcap": state.softcap,
                  "logit_scale": state.scale, "loss_extras": extras}
        aux = _router_aux_loss(self, out, kwargs.get("attention_mask")) if kwargs.get("output_router_logits") else None
    else:
        out = previous(*args, **kwargs)
        source = {"logits": out.logits, "loss_extras": extras}
        aux = getattr(out, "aux_loss", None)
    terms = loss_fn.token_losses(source, labels, metrics=trl_call)
    if trl_call:
        return _trl_outputs(terms, aux)
    loss = loss_fn.reduce(terms, num_items_in_batch)
    if aux is not None:
        loss = loss + getattr(_text_config(self.config), "router_aux_loss_coef", 0.0) * aux.to(loss.device)
    if not fuse:
        # Loss first, as the model's own output puts it (the Trainer reads outputs[0] of tuples).
        result = type(out)(**{"loss": loss, **{k: v for k, v in out.items() if k != "loss"}})
        result.loss_extras = extras
        return result
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=getattr(out, "past_key_values", None),
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )


def _install(target: torch.nn.Module, state: _State) -> None:
    """Put forge's forward over ``target.forward`` (the original one)."""
    previous = target.forward

    # Keep the original signature: `generate` validates its model kwargs against it, and the
    # Trainer reads **kwargs from it to pass `num_items_in_batch`.
    @functools.wraps(type(target).forward)
    def forward(self, *args, labels=None, num_items_in_batch=None, fused_lm_head=False, **kwargs):
        head_call = bool(fused_lm_head) or bool(kwargs.pop(HEAD_KEY, False))
        if not state.active:
            loss_kwargs = {"labels": labels, "num_items_in_batch": num_items_in_batch}
            return previous(*args, **{k: v for k, v in loss_kwargs.items() if v is not None}, **kwargs)
        extras = {k: kwargs.pop(k) for k in state.keys if k in kwargs}
        state.depth += 1
        try:
            if labels is None and not head_call:
                if num_items_in_batch is not None:
                    kwargs["num_items_in_batch"] = num_items_in_batch
                out = previous(*args, **kwargs)
                if extras:
                    # An attribute, not a key: the Trainer turns every output key into "logits" in eval.
                    out.loss_extras = extras
                return out
            if labels is None:
                raise ValueError("a fused-head call (fused_lm_head=True) needs labels")
            return _loss_forward(self, state, previous, args, kwargs, labels, num_items_in_batch, head_call, extras)
        finally:
            state.depth -= 1

    target.forward = types.MethodType(forward, target)
    state.forward, state.previous = target.forward, previous


class _HeadCallsToForge:
    """The model as a wrapped ``compute_loss`` sees it: ``fused_lm_head=True`` becomes forge's key."""

    def __init__(self, model: torch.nn.Module):
        object.__setattr__(self, "_model", model)

    def __call__(self, *args, fused_lm_head: bool = False, **kwargs):
        if fused_lm_head:
            kwargs[HEAD_KEY] = True
        return self._model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def route_fused_head(trainer: Any) -> None:
    """Wrap ``trainer.compute_loss`` (on the instance) so that its fused-head calls reach forge's forward.

    TRL's ``SFTTrainer.compute_loss`` calls ``model(**inputs, fused_lm_head=True)``, which TRL's
    own fused head (patched over the model's forward) would answer without forge. The wrapper hands
    ``compute_loss`` the same model under a view that renames that flag, so the call goes through
    every wrapper (DDP, accelerate's autocast, TRL's head, PEFT) down to forge's forward, which
    answers it. Nothing else about the call changes; idempotent; harmless on a plain ``Trainer``.

    Example:
        >>> trainer = SFTTrainer(model=model, args=args, train_dataset=ds)
        >>> route_fused_head(trainer)    # LossCallback does this when the trainer is built
    """
    routed = getattr(trainer.compute_loss, "_forge_routed", False)
    if routed or getattr(_base_model(trainer.model), "_forge_loss_state", None) is None:
        return  # done already, or forge's forward is not there to answer
    original = trainer.compute_loss

    @functools.wraps(original)
    def compute_loss(model, *args, **kwargs):
        return original(_HeadCallsToForge(model), *args, **kwargs)

    compute_loss._forge_routed = True
    trainer.compute_loss = compute_loss


def _guard(state: _State):
    def hook(module, args, kwargs):
        if state.depth == 0 and module.training and torch.is_grad_enabled():
            state.warn_once(
                "bypass",
                "forge.loss: the decoder ran outside forge's forward while training (another fused LM head, "
                "such as TRL's, answered the trainer's loss call), so forge's loss is not the one being trained; "
                "give the trainer loss_fn.callback() (LossCallback), or call route_fused_head(trainer)",
            )

    return hook


def use_fused_lm_head(
    model: torch.nn.Module,
    loss: Any = None,
    *,
    fused: bool = True,
    extra_keys: Sequence[str] = EXTRA_KEYS,
) -> torch.nn.Module:
    """Patch ``model.forward`` so that a call with ``labels`` returns forge's loss (see the module).

    Calling it again updates the loss and options.

    Args:
        model: A causal LM (``*ForCausalLM``), plain or PEFT-wrapped.
        loss: The :class:`~forge.loss.AdaptiveLoss` to compute; None is plain cross-entropy.
        fused: Apply the LM head chunk by chunk while training (no logits); False keeps the logits
            (the forward still computes forge's loss and routes the batch keys in ``extra_keys``).
        extra_keys: Batch keys to take out of the model inputs and hand to the loss.

    Returns:
        ``model``, patched in place.

    Example:
        >>> model = use_fused_lm_head(model, AdaptiveLoss(focal(2.0)))
        >>> model.train()(input_ids=ids, labels=ids).loss.backward()   # no [batch, seq, vocab] logits
    """
    target = _base_model(model)
    state = getattr(target, "_forge_loss_state", None)
    if state is None:
        state = _State(loss, fused, tuple(extra_keys), target.config)
        target._forge_loss_state = state
        state.had_accepts_loss_kwargs = vars(target).get("accepts_loss_kwargs")
        # The patched forward takes the Trainer's `num_items_in_batch` whatever the model declares.
        target.accepts_loss_kwargs = True
        if target.base_model is not target:
            state.hook = target.base_model.register_forward_pre_hook(_guard(state), with_kwargs=True)
    else:
        state.loss = loss if loss is not None else state.loss
        state.fused, state.keys = fused, tuple(extra_keys)
    if state.forward is None:
        _install(target, state)
    return model


def restore_lm_head(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`use_fused_lm_head` (a wrapper another library put on top stays in place).

    Example:
        >>> model = restore_lm_head(use_fused_lm_head(model))
    """
    target = _base_model(model)
    state = getattr(target, "_forge_loss_state", None)
    if state is None:
        return model
    if target.forward == state.forward:
        target.forward = state.previous
        if target.forward == types.MethodType(type(target).forward, target):
            del target.forward
    state.active = False  # left under another wrapper (TRL's), it passes every call through
    if state.hook is not None:
        state.hook.remove()
    if state.had_accepts_loss_kwargs is None:
        vars(target).pop("accepts_loss_kwargs", None)
    else:
        target.accepts_loss_kwargs = state.had_accepts_loss_kwargs
    del target._forge_loss_state
    return model
