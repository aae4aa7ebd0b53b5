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

Inside: ``core`` (the average, plain PyTorch), ``plan`` (the fused update), ``schedule``
(decay warm-ups), ``distributed`` (what sharding allows), ``callback`` (the Trainer side) and
``config`` (the preset section). See ``docs/ema.md`` for choosing ``decay``, memory cost and
the distributed story.
"""

from forge.ema.callback import EMA_WEIGHTS_NAME, EMACallback
from forge.ema.config import EMAConfig, from_preset
from forge.ema.core import EMAWeights

__all__ = ["EMA_WEIGHTS_NAME", "EMACallback", "EMAConfig", "EMAWeights", "from_preset"]
