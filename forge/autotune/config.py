"""The ``autotune:`` preset section: :class:`AutotuneConfig`, applied before the trainer is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from forge.autotune.data import is_preference, parse_memory
from forge.autotune.probe import storage_bytes
from forge.autotune.result import AutotuneCallback, AutotuneResult, format_table
from forge.autotune.tune import autotune_batch_size
from forge.core.console import note
from forge.core.distributed import sharding_strategy
from forge.errors import ForgeError

__all__ = ["AutotuneConfig", "from_preset"]


@dataclass
@dataclass
class AutotuneConfig:
    """The ``autotune:`` section of a forge preset; :func:`from_preset` applies it.

    Example:
        >>> AutotuneConfig(enabled=True, max_memory="20GB").safety_margin
        0.05
    """

    enabled: bool = field(default=False, metadata={"help": "Tune the batch size and accumulation before training."})
    max_memory: str | None = field(
        default=None,
        metadata={"help": "Memory one step may use per device: 20GB, 16GiB or 90% (of the GPU); "
                  "null = the GPU's free memory (required when training on CPU)."},
    )
    target_global_batch: int | None = field(
        default=None,
        metadata={"help": "Examples per optimizer step across devices; null keeps the preset's "
                  "per_device_train_batch_size x gradient_accumulation_steps x world size."},
    )
    seq_len: int | None = field(
        default=None, metadata={"help": "Tokens per row in the probes; null = measured from the data."}
    )
    length_percentile: float = field(
        default=100.0,
        metadata={"help": "Percentile of data lengths to probe at; 100 = the longest row (safest)."},
    )
    safety_margin: float = field(
        default=0.05,
        metadata={"help": "Fraction of max_memory kept free for fragmentation and transients; "
                  "raise to 0.1 when other processes share the GPU."},
    )
    tune_eval: bool = field(
        default=True,
        metadata={"help": "Also tune per_device_eval_batch_size (when evaluation is on); never "
                  "changes the training batch."},
    )
    max_eval_batch: int = field(default=256, metadata={"help": "Largest evaluation batch to consider."})

    def __post_init__(self) -> None:
        errors = []
        if not 0.0 <= self.safety_margin < 0.5:
            errors.append(f"safety_margin must be in [0, 0.5), got {self.safety_margin!r}")
        if not 0.0 < self.length_percentile <= 100.0:
            errors.append(f"length_percentile must be in (0, 100], got {self.length_percentile!r}")
        for name in ("target_global_batch", "seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.append(f"{name} must be a positive integer, got {value!r}")
        if self.max_memory is not None:
            try:
                parse_memory(self.max_memory, total=1)
            except ForgeError as err:
                errors.append(str(err))
        if errors:
            raise ValueError("autotune: " + "; ".join(errors))


def is_evaluating(args: Any) -> bool:
    strategy = getattr(args, "eval_strategy", "no")
    return str(getattr(strategy, "value", strategy)).lower() != "no"


def place_for_training(model: nn.Module, args: Any) -> None:
    """Put the model where the Trainer will, so the probes measure the right device."""
    if sharding_strategy(args) is not None:  # set in the arguments, or by accelerate launch
        raise ForgeError("autotune: FSDP and DeepSpeed shard the model, which the probes do not "
                         "model yet; set per_device_train_batch_size by hand or turn autotune off")
    device = args.device
    placed = getattr(model, "is_quantized", False) or getattr(model, "hf_device_map", None)
    if device.type != "cpu" and not placed and next(model.parameters()).device != device:
        model.to(device)


def tune_for_preset(cfg: AutotuneConfig, model: nn.Module, args: Any, dataset: Any, tokenizer: Any,
                    evaluating: bool, apply: bool, reserved_bytes: int = 0) -> AutotuneResult:
    """Tune for a preset; ``reserved_bytes`` is what other features hold beside the step
    (the EMA shadow, the monitor's weight copy), known after the model transforms."""
    reserved = int(reserved_bytes)
    if dataset is not None and is_preference(dataset) and not hasattr(model, "peft_config"):
        reserved += storage_bytes(model.parameters())  # DPO's frozen reference copy of the model
    resume = getattr(args, "resume_from_checkpoint", None)
    return autotune_batch_size(
        model, training_args=args, dataset=dataset, tokenizer=tokenizer,
        target_global_batch=cfg.target_global_batch, max_memory=cfg.max_memory, seq_len=cfg.seq_len,
        length_percentile=cfg.length_percentile, safety_margin=cfg.safety_margin,
        reserved_bytes=reserved, tune_eval=cfg.tune_eval and evaluating,
        max_eval_batch=cfg.max_eval_batch,
        resume_from_checkpoint=resume if isinstance(resume, str) else None, apply=apply)


def from_preset(cfg: AutotuneConfig, model: nn.Module, training_args: Any, train_dataset: Any = None,
                tokenizer: Any = None, reserved_bytes: int = 0) -> dict[str, Any]:
    """Tune ``training_args`` in place for a preset's ``autotune:`` section, before the trainer is built.

    Args:
        cfg: the validated section.
        model: the loaded model (PEFT-wrapped and quantized as it will train); moved to the
            training device if it is not there yet, as the Trainer would.
        training_args: the run's ``SFTConfig``/``DPOConfig``; its per-device batch,
            accumulation and (with ``tune_eval`` and evaluation on) eval batch are
            overwritten. A checkpoint path in its ``resume_from_checkpoint`` reuses the
            choice saved there.
        train_dataset: rows from :func:`forge.recipes.data.load_examples`, to measure lengths.
        tokenizer: tokenises those rows with its chat template.
        reserved_bytes: memory other features hold beside each step (EMA shadow, the
            monitor's weight copy), kept out of the budget. ``forge train`` runs autotune on
            the model after every transform (quantization, PEFT, freezing, the fused loss) and
            passes what the EMA and monitor sections will hold.

    Returns:
        ``{"callbacks": [AutotuneCallback]}`` (records the choice in checkpoints) when
        enabled, else ``{}``; the table is printed on the main process.

    Example:
        >>> from_preset(AutotuneConfig(), model, args)
        {}
    """
    if not cfg.enabled:
        return {}
    place_for_training(model, training_args)
    result = tune_for_preset(cfg, model, training_args, train_dataset, tokenizer,
                             is_evaluating(training_args), apply=True, reserved_bytes=reserved_bytes)
    if getattr(training_args, "process_index", 0) == 0:
        print(format_table(result), flush=True)
    note(f"autotune: per_device_train_batch_size {result.per_device_train_batch_size} x "
         f"gradient_accumulation_steps {result.gradient_accumulation_steps} x {result.world_size} "
         f"process(es) = global batch {result.global_batch}")
    return {"callbacks": [AutotuneCallback(result)]}
