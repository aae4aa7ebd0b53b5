"""Recipes: what ``forge train`` and ``forge autotune`` run, composed from the feature packages.

``model`` loads the model and tokenizer a preset names (dtype, quantization, PEFT, chat
template), ``data`` reads and checks the training rows, ``checkpoints`` keeps half-written
checkpoints from being resumed, ``train`` runs a preset end to end and ``autotune`` tunes
its batch without training.

Example:
    >>> import forge
    >>> result = forge.train(forge.load_preset("lora", {"training.max_steps": 20}))
"""

from forge.recipes.autotune import autotune_preset
from forge.recipes.data import load_examples
from forge.recipes.model import load_model, load_tokenizer
from forge.recipes.runner import TrainResult, build_trainer, train

__all__ = ["TrainResult", "autotune_preset", "build_trainer", "load_examples", "load_model",
           "load_tokenizer", "train"]
