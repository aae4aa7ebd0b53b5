"""forge: drop-in fine-tuning pieces and YAML presets for HuggingFace Transformers.

Everything public is importable from here; the feature modules load on first use, so
``import forge`` stays quick and pulls in no tracker or kernel code.

Example:
    >>> import forge
    >>> preset = forge.load_preset("lora", ["training.max_steps=100"])
    >>> args, lora = preset.training_args(), preset.peft_config()
    >>> callbacks = [forge.EMACallback(decay=0.999), forge.GradientMonitor()]
"""

from __future__ import annotations

import logging

from forge.config.loader import Preset, list_presets, load_preset
from forge.core.lazy import lazy_exports
from forge.errors import ConfigError, ForgeError

__version__ = "0.1.0"


class _DropNotice(logging.Filter):
    """Drops one library notice that reads like an error to a user but is not one.

    * bitsandbytes looks for an optional Hub kernel on CPUs with AVX512-BF16 and warns when it
      is absent; its own fallback is correct and forge never downloads kernels.
    * DeepSpeed, merely installed (the ``distributed`` extra), is imported by accelerate on
      every run and warns that it set its accelerator to CPU on a machine without a GPU; a
      DeepSpeed run on CPU sets ``DS_ACCELERATOR=cpu`` and never sees it.
    """

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# A filter on a named logger costs nothing and imports nothing (both libraries stay lazy).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropNotice("Failed to load CPU gemm_4bit_forward"))
logging.getLogger("DeepSpeed").addFilter(_DropNotice("Setting accelerator to CPU"))

# public name -> module that defines it (imported lazily by __getattr__)
_LAZY: dict[str, str] = {
    "train": "forge.recipes", "build_trainer": "forge.recipes", "TrainResult": "forge.recipes",
    "autotune_preset": "forge.recipes",
    "load_examples": "forge.recipes", "load_model": "forge.recipes", "load_tokenizer": "forge.recipes",
    # EMA weights
    "EMAWeights": "forge.ema", "EMACallback": "forge.ema", "EMAConfig": "forge.ema",
    # layers: discovery, freezing, schedules, layer-wise LR, automatic freeze choice
    "find_layers": "forge.layers", "freeze_layers": "forge.layers", "unfreeze_all": "forge.layers",
    "freeze_table": "forge.layers", "LayerInfo": "forge.layers", "FreezeReport": "forge.layers",
    "GradualUnfreezingCallback": "forge.layers", "LPLoRACallback": "forge.layers",
    "LISACallback": "forge.layers", "layerwise_lr_groups": "forge.layers",
    "layerwise_lr_optimizer": "forge.layers", "suggest_freeze": "forge.layers",
    "FreezeSuggestion": "forge.layers", "FreezeConfig": "forge.layers",
    # adaptive token-level loss on the fused chunked linear + cross-entropy
    # (the strategy factories, e.g. forge.loss.focal, stay under forge.loss: too generic here)
    "fused_linear_cross_entropy": "forge.loss", "AdaptiveLoss": "forge.loss",
    "LossConfig": "forge.loss", "use_fused_lm_head": "forge.loss", "restore_lm_head": "forge.loss",
    "ExampleWeightCollator": "forge.loss", "TokenWeighting": "forge.loss",
    "LossCallback": "forge.loss", "ResponseOnlyCollator": "forge.loss",
    # training monitor
    "GradientMonitor": "forge.monitor", "MonitorConfig": "forge.monitor",
    "GradientAnomalyError": "forge.monitor", "Anomaly": "forge.monitor",
    # batch-size autotuning
    "autotune_batch_size": "forge.autotune", "AutotuneResult": "forge.autotune",
    "AutotuneCallback": "forge.autotune", "AutotuneConfig": "forge.autotune",
    # trackers and report
    "ForgeTensorBoardCallback": "forge.trackers", "ForgeWandbCallback": "forge.trackers",
    "ForgeMLflowCallback": "forge.trackers", "TensorBoardSpec": "forge.trackers",
    "WandbSpec": "forge.trackers", "MLflowSpec": "forge.trackers",
    "MissingTrackerError": "forge.trackers", "parse_trackers": "forge.trackers",
    "write_report": "forge.report",
    # after training: merge, generate, evaluate a run directory
    "merge_run": "forge.workflow", "generate_run": "forge.workflow", "evaluate_run": "forge.workflow",
    # pre-flight checks, learning-rate range test, hyperparameter search
    "check_trainer": "forge.doctor", "data_checks": "forge.doctor", "doctor_preset": "forge.recipes.doctor",
    "lr_find": "forge.tune", "sweep": "forge.tune",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = ["ConfigError", "ForgeError", "Preset", "list_presets", "load_preset", "__version__",
           *_LAZY]
