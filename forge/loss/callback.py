"""The loss section's callback: the trainer's loss call reaches forge's forward, and forge's
figures reach every tracker.

TRL's ``SFTTrainer`` computes its loss through a fused LM head of its own, patched over the model's
forward. When the trainer is built (``on_init_end``, or ``on_train_begin`` for a callback added
later) :class:`LossCallback` wraps the trainer instance's ``compute_loss`` with
:func:`~forge.loss.patch.route_fused_head`, so that TRL's one forward per micro-batch is answered
by forge's forward: forge's loss and TRL's metrics from the same pass. With a plain ``Trainer``
that changes nothing; the callback then only logs the figures.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from forge.core.figures import add_figures, is_eval_log, put_ahead_of_trackers
from forge.core.trainer_lookup import find_trainer_on_stack
from forge.loss.patch import route_fused_head


class LossCallback(TrainerCallback):
    """Routes the trainer's loss call to forge's forward; logs ``forge/loss/...`` at each log.

    Args:
        loss: The :class:`~forge.loss.AdaptiveLoss` the model was patched with.

    Example:
        >>> loss_fn = AdaptiveLoss(strategy=focal(2.0)).attach(model)
        >>> trainer = SFTTrainer(model=model, args=args, train_dataset=ds, callbacks=[LossCallback(loss_fn)])
    """

    def __init__(self, loss: Any) -> None:
        self.loss = loss

    def on_init_end(self, args, state, control, **kwargs):
        trainer, _ = find_trainer_on_stack()
        if trainer is not None:
            route_fused_head(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer, _ = find_trainer_on_stack()
        if trainer is not None:
            route_fused_head(trainer)
            put_ahead_of_trackers(trainer.callback_handler, self)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not is_eval_log(logs):
            add_figures(logs, state, self.loss.stats.figures())


# The name this callback had while it only logged figures.
LossFiguresCallback = LossCallback
