"""Adaptive token-level loss on a fused, chunked linear + cross-entropy.

Inside: ``ops/`` (the maths: the chunked autograd Function and its functional face, tested
against ``F.cross_entropy`` without any Trainer), ``strategies`` (token weightings),
``adaptive`` (the loss callable a Trainer takes), ``patch`` (the model forward that hands the
LM head to the loss) and ``config`` (the ``loss:`` preset section).

Two ways in, on an unchanged ``transformers.Trainer`` or TRL ``SFTTrainer``::

    from forge.loss import AdaptiveLoss, focal, use_fused_lm_head

    loss_fn = AdaptiveLoss(strategy=focal(2.0), z_loss=1e-4)
    use_fused_lm_head(model)            # optional: never build the [batch, seq, vocab] logits
    trainer = Trainer(model=model, args=args, train_dataset=ds, compute_loss_func=loss_fn)

Without :func:`use_fused_lm_head` the same loss runs on the model's logits. With it, the model
returns its last hidden state and :func:`fused_linear_cross_entropy` applies the model's own LM head
chunk by chunk, computing the gradients in the forward pass. See ``docs/loss.md``.
"""

from forge.loss.adaptive import AdaptiveLoss
from forge.loss.config import LossConfig, from_preset
from forge.loss.figures import LossFiguresCallback
from forge.loss.ops.functional import fused_linear_cross_entropy
from forge.loss.patch import ExampleWeightCollator, restore_lm_head, use_fused_lm_head
from forge.loss.strategies import (
                                   TokenWeighting,
                                   custom,
                                   dft,
                                   entropy,
                                   example_weights,
                                   focal,
                                   hard_tokens,
                                   response_only,
)

__all__ = [
    "AdaptiveLoss",
    "ExampleWeightCollator",
    "LossConfig",
    "LossFiguresCallback",
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
