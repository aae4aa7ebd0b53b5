"""Presets: the schema (one typed dataclass per section), the loader (``extends``, ``--set``,
strict validation) and the shipped YAML presets in ``presets/``.

Example:
    >>> import forge
    >>> preset = forge.load_preset("qlora", overrides=["training.learning_rate=1e-4"])
    >>> args = preset.training_args()          # trl.SFTConfig
    >>> lora = preset.peft_config()            # peft.LoraConfig
"""

from forge.config.loader import (
                                 SHORTCUTS,
                                 Preset,
                                 list_presets,
                                 load_preset,
                                 parse_override,
                                 presets_dir,
)
from forge.config.schema import (
                                 DATA_FORMATS,
                                 DTYPES,
                                 FEATURE_SECTIONS,
                                 METHODS,
                                 DataConfig,
                                 ModelConfig,
                                 feature_config_class,
                                 has_eval,
                                 training_config_class,
                                 validate,
)

__all__ = ["DATA_FORMATS", "DTYPES", "FEATURE_SECTIONS", "METHODS", "SHORTCUTS", "DataConfig", "ModelConfig",
           "Preset", "feature_config_class", "has_eval", "list_presets", "load_preset", "parse_override",
           "presets_dir", "training_config_class", "validate"]
