"""The loss section's callback: forge's forward stays in charge of the loss, and its figures reach
every tracker.

TRL's ``SFTTrainer`` patches a fused LM head of its own over the model's forward when it is built,
after any callback saw the model, and computes its loss through it. At ``on_train_begin``
:class:`LossCallback` puts forge's patched forward back on top (see :mod:`forge.loss.patch`), so
TRL's one forward per micro-batch computes forge's loss and TRL's metrics alike. With a plain
``Trainer`` there is nothing to reorder; the callback then only logs the figures.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from forge.core.figures import add_figures, is_eval_log, put_ahead_of_trackers
from forge.core.trainer_lookup import find_trainer_on_stack
from forge.loss.patch import keep_on_top


class LossCallback(TrainerCallback):
    """Keeps forge's loss on top of the trainer's forward; logs ``forge/loss/...`` at each log.

    Args:
        loss: The :class:`~forge.loss.AdaptiveLoss` the model was patched with.

    Example:
        >>> loss_fn = AdaptiveLoss(strategy=focal(2.0)).attach(model)
        >>> trainer = SFTTrainer(model=model, args=args, train_dataset=ds, callbacks=[LossCallback(loss_fn)])
    """

    def __init__(self, loss: Any) -> None:
        self.loss = loss

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer, _ = find_trainer_on_stack()
        if trainer is not None:
            put_ahead_of_trackers(trainer.callback_handler, self)
            model = trainer.model
        if model is not None:
            keep_on_top(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not is_eval_log(logs):
            add_figures(logs, state, self.loss.stats.figures())


# The name this callback had while it only logged figures.
LossFiguresCallback = LossCallback
