"""forge: drop-in fine-tuning pieces and YAML presets for HuggingFace Transformers.

Example:
    >>> import forge
    >>> preset = forge.load_preset("lora", ["training.max_steps=100"])
    >>> args, lora = preset.training_args(), preset.peft_config()
"""

from forge.errors import ConfigError, ForgeError
from forge.presets import Preset, list_presets, load_preset

__version__ = "0.1.0"


def train(*args, **kwargs):
    """Train a preset end to end; see :func:`forge.train.train`."""
    from forge.train import train as _train

    return _train(*args, **kwargs)


__all__ = ["ConfigError", "ForgeError", "Preset", "list_presets", "load_preset", "train",
           "__version__"]
