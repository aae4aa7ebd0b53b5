"""Layers: freeze blocks, schedule which ones train, decay the learning rate by depth.

Every piece works on the blocks :func:`find_layers` discovers (by structure, on any HF model,
plain or PEFT-wrapped): ``freeze`` (static freezing and the per-block table), ``schedule`` and
``schedules`` (gradual unfreezing, LP-LoRA, LISA as ``TrainerCallback``s), ``llrd`` (layer-wise
learning-rate decay), ``suggest`` (how many blocks to freeze for a memory budget) and
``config`` (the ``freeze:`` preset section).

Example::

    from forge.layers import freeze_layers, LISACallback
    print(freeze_layers(model, ratio=0.5, embeddings=True))   # bottom half + embeddings
    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[LISACallback(model, active_layers=2, every_n_steps=20)])
"""

from forge.core.discovery import LayerInfo, find_layers
from forge.layers.config import FreezeConfig, from_preset
from forge.layers.freeze import (
                                 FreezeReport,
                                 freeze_layers,
                                 freeze_table,
                                 set_trainable_,
                                 trainable_universe,
                                 unfreeze_all,
)
from forge.layers.llrd import (
                                 LayerwiseLRDecayFactory,
                                 layer_depths,
                                 layerwise_lr_groups,
                                 layerwise_lr_optimizer,
)
from forge.layers.schedules import (
                                 GradualUnfreezingCallback,
                                 LISACallback,
                                 LPLoRACallback,
)
from forge.layers.suggest import FreezePlan, FreezeSuggestion, suggest_freeze

__all__ = [
    "FreezeConfig", "FreezePlan", "FreezeReport", "FreezeSuggestion", "GradualUnfreezingCallback",
    "LISACallback", "LPLoRACallback", "LayerInfo", "LayerwiseLRDecayFactory", "find_layers",
    "freeze_layers", "freeze_table", "from_preset", "layer_depths", "layerwise_lr_groups",
    "layerwise_lr_optimizer", "set_trainable_", "suggest_freeze", "trainable_universe", "unfreeze_all",
]
