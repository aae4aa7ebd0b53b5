"""Adaptive token-level loss on a fused, chunked linear + cross-entropy.

Inside: ``ops/`` (the maths: the chunked autograd Function, its PyTorch and Triton per-row
kernels and its functional face, tested against ``F.cross_entropy`` without any Trainer),
``strategies`` (token weightings), ``adaptive`` (the loss), ``patch`` (the model forward that
computes it), ``collators`` (prompt masking and example weights in the batch), ``figures`` and
``callback`` (what the trackers show) and ``config`` (the ``loss:`` preset section).

On an unchanged ``transformers.Trainer`` or TRL ``SFTTrainer``::

    from forge.loss import AdaptiveLoss, focal

    loss_fn = AdaptiveLoss(strategy=focal(2.0), z_loss=1e-4).attach(model)   # patches model.forward
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, callbacks=[loss_fn.callback()])

The patched forward computes the loss in the trainer's one decoder pass per micro-batch; while
training, :func:`fused_linear_cross_entropy` applies the model's own LM head chunk by chunk and
computes the gradients in the forward pass, so the ``[batch, seq, vocab]`` logits never exist.
See ``docs/loss.md``.
"""

from __future__ import annotations

from forge.core.lazy import lazy_exports

# public name -> module that defines it. Imported on first use, so that the plain-PyTorch maths
# (``forge.loss.ops``) loads without transformers' Trainer, TRL or PEFT.
_LAZY: dict[str, str] = {
    "AdaptiveLoss": "forge.loss.adaptive", "TokenLosses": "forge.loss.adaptive",
    "LossCallback": "forge.loss.callback", "LossFiguresCallback": "forge.loss.callback",
    "ExampleWeightCollator": "forge.loss.collators", "ResponseOnlyCollator": "forge.loss.collators",
    "LossConfig": "forge.loss.config", "from_preset": "forge.loss.config",
    "fused_linear_cross_entropy": "forge.loss.ops.functional",
    "route_fused_head": "forge.loss.patch", "restore_lm_head": "forge.loss.patch",
    "use_fused_lm_head": "forge.loss.patch",
    **dict.fromkeys(["TokenWeighting", "custom", "dft", "entropy", "example_weights", "focal", "hard_tokens",
                     "response_only"], "forge.loss.strategies"),
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
