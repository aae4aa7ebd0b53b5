"""Choose the per-device batch and gradient accumulation that fill memory and keep the global batch.

Plain HF Trainer (after the Trainer is built, before ``train()``)::

    trainer = Trainer(model, args, train_dataset=ds, eval_dataset=dev)
    result = autotune_batch_size(trainer, target_global_batch=64, tune_eval=True)
    print(format_table(result))            # probes, memory model, choice
    trainer.train()                         # runs with the chosen batch and accumulation

Preset: ``autotune: {enabled: true, max_memory: 20GB}`` does it before ``forge train``, and
``forge autotune PRESET --max-memory 20GB --target-global-batch 64`` prints the table.

How it decides (at most five real steps, see ``docs/autotune.md``): peak memory is close to
linear in the batch for a fixed sequence length, so two small probes fit a line, a third
refines it when the extrapolation is long, the batch the run will use is confirmed by one
probe, and a failure backs off once. On CUDA the probes read the allocator's peak and catch
out-of-memory errors; elsewhere (and in tests) they count the bytes a step keeps alive against
an explicit ``max_memory``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from forge._console import note
from forge._autotune_data import format_bytes, is_preference, parse_memory, sequence_length
from forge._autotune_probe import (StepProbe, agree_across_ranks, as_trained, autocast_dtype,
                                   budget_bytes, is_trainer, optimizer_factory, storage_bytes,
                                   world_size_of)
from forge._autotune_result import AutotuneCallback, AutotuneResult, format_table, load_choice
from forge._autotune_search import (LinearFit, Probe, accumulation_for, search_batch_size,
                                    split_global_batch)
from forge.errors import ForgeError

__all__ = ["AutotuneCallback", "AutotuneConfig", "AutotuneResult", "LinearFit", "Probe",
           "autotune_batch_size", "autotune_preset", "format_table", "from_preset", "parse_memory",
           "sequence_length"]

# Documented here; defined in private modules to keep each file to one concept.
for _cls in (AutotuneCallback, AutotuneResult, LinearFit, Probe):
    _cls.__module__ = __name__

DEFAULT_MAX_BATCH = 1024  # cap when there is no target global batch to cap at


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


def autotune_batch_size(
    trainer_or_model: Any,
    *,
    target_global_batch: int | None = None,
    max_memory: int | str | None = None,
    seq_len: int | None = None,
    training_args: Any = None,
    dataset: Any = None,
    tokenizer: Any = None,
    world_size: int | None = None,
    safety_margin: float = 0.05,
    length_percentile: float = 100.0,
    reserved_bytes: int = 0,
    tune_eval: bool = False,
    eval_seq_len: int | None = None,
    max_batch: int | None = None,
    max_eval_batch: int = 256,
    resume_from_checkpoint: str | None = None,
    measure: Callable[[int], int | None] | None = None,
    eval_measure: Callable[[int], int | None] | None = None,
    apply: bool = True,
) -> AutotuneResult:
    """Find the per-device batch and accumulation steps that fit memory and keep the global batch.

    Args:
        trainer_or_model: a built ``Trainer`` (its model, args and train dataset are used, its
            args updated and an :class:`AutotuneCallback` added), or a model (then pass
            ``training_args`` and/or ``seq_len``).
        target_global_batch: examples per optimizer step over all devices. None keeps the
            Trainer's (or ``training_args``') per-device x accumulation x world size; with a
            bare model and no args, the largest per-device batch is chosen.
        max_memory: bytes one step may use per device, or a size such as ``"20GB"``,
            ``"16GiB"``, ``"90%"``. None on CUDA: the free memory; required elsewhere.
        seq_len: tokens per row in the probes; None measures it from ``dataset``.
        training_args: ``TrainingArguments`` for a bare model: batch, accumulation, optimizer,
            mixed precision and gradient checkpointing are read from them.
        dataset: training rows to measure the sequence length from (tokenised, or forge's
            conversational rows with ``tokenizer``); default the Trainer's train dataset.
        tokenizer: tokenises conversational rows with its chat template.
        world_size: data-parallel processes; default from the args or torch.distributed.
        safety_margin: fraction of the budget the prediction keeps free.
        length_percentile: which data length to probe at (100: the longest).
        reserved_bytes: memory the probe cannot see (a DPO reference model, other
            processes); DDP's gradient buckets are added for ``world_size > 1``.
        tune_eval: also choose ``per_device_eval_batch_size`` (forward only, under the
            budget less the optimizer state); the training choice is made first and kept.
        eval_seq_len: tokens per row for the evaluation probes (default ``seq_len``).
        max_batch: never choose a larger per-device batch (default: the target's per-device
            share, else 1024).
        max_eval_batch: never choose a larger evaluation batch.
        resume_from_checkpoint: a checkpoint directory; when it holds the choice of the run
            being resumed (``autotune.json``) and the world size is the same, that choice is
            reused without probing, so the resumed run sees the same batches.
        measure: replaces the built-in training probe: ``measure(batch)`` returns peak bytes
            or None on out-of-memory (for custom training steps, or to inject failures).
        eval_measure: the same for the evaluation probe.
        apply: write the choice into the Trainer's (or ``training_args``') arguments.

    Returns:
        An :class:`AutotuneResult`; ``format_table(result)`` shows it.

    Raises:
        ForgeError: no budget on a non-CUDA device, no way to tell the sequence length, or
            not even one example fits.

    Example:
        >>> args = TrainingArguments("out", per_device_train_batch_size=8, gradient_accumulation_steps=8)
        >>> result = autotune_batch_size(model, training_args=args, max_memory="4GB", seq_len=512)
        >>> args.per_device_train_batch_size * args.gradient_accumulation_steps
        64
    """
    started = time.perf_counter()
    trainer = trainer_or_model if is_trainer(trainer_or_model) else None
    model = trainer.model if trainer is not None else trainer_or_model
    args = trainer.args if trainer is not None else training_args
    if trainer is not None:
        dataset = dataset if dataset is not None else trainer.train_dataset
        tokenizer = tokenizer if tokenizer is not None else getattr(trainer, "processing_class", None)
    world = int(world_size) if world_size is not None else world_size_of(args)
    if target_global_batch is None and args is not None:
        target_global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world

    saved = load_choice(resume_from_checkpoint)
    if saved is not None and saved.get("world_size") == world:
        result = _reused(saved, resume_from_checkpoint, time.perf_counter() - started)
    else:
        if seq_len is None:
            if dataset is None:
                raise ForgeError("autotune: pass seq_len or a training dataset to measure it from")
            seq_len = sequence_length(dataset, tokenizer, percentile=length_percentile,
                                      max_length=getattr(args, "max_length", None),
                                      packing=bool(getattr(args, "packing", False)))
        result = _search(model, args, target_global_batch, world, max_memory, seq_len,
                         safety_margin, reserved_bytes, max_batch,
                         rows=2 if dataset is not None and is_preference(dataset) else 1,
                         measure=measure)
        if tune_eval:
            _search_eval(result, model, args, eval_seq_len or seq_len, max_eval_batch,
                         rows=2 if dataset is not None and is_preference(dataset) else 1,
                         measure=eval_measure)
        result.seconds = time.perf_counter() - started
        if saved is not None:
            result.notes.append(f"the choice saved in {resume_from_checkpoint} was for {saved.get('world_size')} "
                                f"processes, not {world}; tuned again")
    if apply and args is not None:
        _apply(result, args, trainer)
    return result


def _search(model: nn.Module, args: Any, target: int | None, world: int, max_memory: int | str | None,
            seq_len: int, margin: float, reserved_bytes: int, max_batch: int | None, rows: int,
            measure: Callable[[int], int | None] | None) -> AutotuneResult:
    """The training search: budget, probe, five-probe search, split into accumulation."""
    device = next(model.parameters()).device
    mode = "cuda" if device.type == "cuda" else "accounting"
    reserved = int(reserved_bytes)
    if world > 1:
        # DDP keeps a gradient-sized bucket copy of the trainable parameters.
        reserved += storage_bytes(p for p in model.parameters() if p.requires_grad)
    budget = budget_bytes(max_memory, device) - reserved
    cap = math.ceil(target / world) if target is not None else DEFAULT_MAX_BATCH
    cap = min(cap, max_batch) if max_batch else cap
    probe = StepProbe(model, seq_len, mode=mode, optimizer_factory=optimizer_factory(args, model),
                      autocast_dtype=autocast_dtype(args), rows_per_example=rows)
    with as_trained(model, args, device):
        outcome = search_batch_size(measure or probe, budget, cap=cap, margin=margin,
                                    pick=lambda limit: split_global_batch(limit, target, world)[0])
    if outcome.batch_size == 0:
        one = outcome.probes[0].bytes
        raise ForgeError(
            f"autotune: not even one example of {seq_len} tokens fits in {format_bytes(budget)} "
            f"(one needs {format_bytes(one) if one else 'more'}); lower max_length, enable "
            "gradient checkpointing or LoRA, or raise max_memory")
    per_device = agree_across_ranks(outcome.batch_size, device)
    steps = accumulation_for(per_device, target, world)
    result = AutotuneResult(
        per_device_train_batch_size=per_device, gradient_accumulation_steps=steps, world_size=world,
        global_batch=per_device * steps * world, target_global_batch=target,
        max_per_device=outcome.limit, seq_len=seq_len, budget=budget, reserved=reserved,
        safety_margin=margin, mode=mode, probes=outcome.probes, fit=outcome.fit,
        backed_off=outcome.backed_off)
    result.optimizer_bytes = probe.optimizer_bytes
    if not result.exact:
        result.notes.append(
            f"global batch {result.global_batch} is the closest to the target {target} with a "
            f"per-device batch between {max(1, (outcome.limit + 1) // 2)} and {outcome.limit}")
    if outcome.backed_off:
        failed = [p.batch_size for p in outcome.probes if not p.ok]
        result.notes.append(f"batch {failed[-1]} did not fit; backed off to {per_device}")
    if result.exact and target is not None and per_device < outcome.limit:
        result.notes.append(f"memory allows up to {outcome.limit} per device; {per_device} x {steps} "
                            f"x {world} keeps the global batch at exactly {target}")
    if outcome.fit is not None and outcome.limit == cap:
        room = outcome.fit.largest_under(budget * (1 - margin))
        if room > cap:
            result.notes.append(f"memory allows about {room} per device; capped at {cap}")
    return result


def _search_eval(result: AutotuneResult, model: nn.Module, args: Any, seq_len: int, cap: int, rows: int,
                 measure: Callable[[int], int | None] | None) -> None:
    """The evaluation search, after and apart from the training one, whose choice it never touches."""
    device = next(model.parameters()).device
    probe = StepProbe(model, seq_len, mode=result.mode, train=False, autocast_dtype=autocast_dtype(args),
                      rows_per_example=rows)
    # The Trainer evaluates mid-run, with the optimizer state still allocated.
    result.eval_budget = result.budget - result.optimizer_bytes
    with as_trained(model, args, device):
        found = search_batch_size(measure or probe, result.eval_budget, cap=cap,
                                  margin=result.safety_margin)
    result.eval_probes = found.probes
    result.per_device_eval_batch_size = agree_across_ranks(max(1, found.batch_size), device)
    if found.batch_size == 0:
        result.notes.append("not even one evaluation example fits; per_device_eval_batch_size set to 1")


def _reused(saved: dict[str, Any], checkpoint: str, seconds: float) -> AutotuneResult:
    """A result from a checkpoint's ``autotune.json``: the resumed run keeps its batches."""
    per_device = int(saved["per_device_train_batch_size"])
    result = AutotuneResult(
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=int(saved["gradient_accumulation_steps"]),
        world_size=int(saved["world_size"]), global_batch=int(saved["global_batch"]),
        target_global_batch=saved.get("target_global_batch"), max_per_device=per_device,
        seq_len=int(saved.get("seq_len") or 0), budget=0, mode="reused", seconds=seconds,
        per_device_eval_batch_size=saved.get("per_device_eval_batch_size"))
    result.notes.append(f"reused the choice saved in {checkpoint}, so the resumed run sees the same batches")
    return result


def _apply(result: AutotuneResult, args: Any, trainer: Any = None) -> None:
    args.per_device_train_batch_size = result.per_device_train_batch_size
    args.gradient_accumulation_steps = result.gradient_accumulation_steps
    if result.per_device_eval_batch_size is not None:
        args.per_device_eval_batch_size = result.per_device_eval_batch_size
    if trainer is not None:
        # The Trainer copies the batch size at construction (its auto_find_batch_size state);
        # the dataloader reads that copy, not the arguments.
        trainer._train_batch_size = args.train_batch_size
        trainer.pop_callback(AutotuneCallback)
        trainer.add_callback(AutotuneCallback(result))


def _evaluating(args: Any) -> bool:
    strategy = getattr(args, "eval_strategy", "no")
    return str(getattr(strategy, "value", strategy)).lower() != "no"


def _place_for_training(model: nn.Module, args: Any) -> None:
    """Put the model where the Trainer will, so the probes measure the right device."""
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        raise ForgeError("autotune: FSDP and DeepSpeed shard the model, which the probes do not "
                         "model yet; set per_device_train_batch_size by hand or turn autotune off")
    device = args.device
    placed = getattr(model, "is_quantized", False) or getattr(model, "hf_device_map", None)
    if device.type != "cpu" and not placed and next(model.parameters()).device != device:
        model.to(device)


def _tune_for_preset(cfg: AutotuneConfig, model: nn.Module, args: Any, dataset: Any, tokenizer: Any,
                     evaluating: bool, apply: bool) -> AutotuneResult:
    reserved = 0
    if dataset is not None and is_preference(dataset) and not hasattr(model, "peft_config"):
        reserved = storage_bytes(model.parameters())  # DPO's frozen reference copy of the model
    resume = getattr(args, "resume_from_checkpoint", None)
    return autotune_batch_size(
        model, training_args=args, dataset=dataset, tokenizer=tokenizer,
        target_global_batch=cfg.target_global_batch, max_memory=cfg.max_memory, seq_len=cfg.seq_len,
        length_percentile=cfg.length_percentile, safety_margin=cfg.safety_margin,
        reserved_bytes=reserved, tune_eval=cfg.tune_eval and evaluating,
        max_eval_batch=cfg.max_eval_batch,
        resume_from_checkpoint=resume if isinstance(resume, str) else None, apply=apply)


def from_preset(cfg: AutotuneConfig, model: nn.Module, training_args: Any, train_dataset: Any = None,
                tokenizer: Any = None) -> dict[str, Any]:
    """Tune ``training_args`` in place for a preset's ``autotune:`` section, before the trainer is built.

    Args:
        cfg: the validated section.
        model: the loaded model (PEFT-wrapped and quantized as it will train); moved to the
            training device if it is not there yet, as the Trainer would.
        training_args: the run's ``SFTConfig``/``DPOConfig``; its per-device batch,
            accumulation and (with ``tune_eval`` and evaluation on) eval batch are
            overwritten. A checkpoint path in its ``resume_from_checkpoint`` reuses the
            choice saved there.
        train_dataset: rows from :func:`forge.data.load_examples`, to measure lengths.
        tokenizer: tokenises those rows with its chat template.

    Returns:
        ``{"callbacks": [AutotuneCallback]}`` (records the choice in checkpoints) when
        enabled, else ``{}``; the table is printed on the main process.

    Example:
        >>> from_preset(AutotuneConfig(), model, args)
        {}
    """
    if not cfg.enabled:
        return {}
    _place_for_training(model, training_args)
    result = _tune_for_preset(cfg, model, training_args, train_dataset, tokenizer,
                              _evaluating(training_args), apply=True)
    if getattr(training_args, "process_index", 0) == 0:
        print(format_table(result), flush=True)
    note(f"autotune: per_device_train_batch_size {result.per_device_train_batch_size} x "
         f"gradient_accumulation_steps {result.gradient_accumulation_steps} x {result.world_size} "
         f"process(es) = global batch {result.global_batch}")
    return {"callbacks": [AutotuneCallback(result)]}


def autotune_preset(preset: Any, max_memory: str | None = None,
                    target_global_batch: int | None = None) -> AutotuneResult:
    """Load a preset's model, tokenizer and data as ``forge train`` does, and tune its batch.

    The preset's ``autotune:`` section (if any) supplies the settings and the arguments
    override it. Nothing is trained and the preset is not changed.

    Args:
        preset: from :func:`forge.load_preset`.
        max_memory: per-device budget such as ``"20GB"`` (required without a GPU).
        target_global_batch: examples per optimizer step; default the preset's.

    Returns:
        An :class:`AutotuneResult`; print it with :func:`format_table`.

    Raises:
        ForgeError: as :func:`autotune_batch_size`, or the preset's model/data cannot load.

    Example:
        >>> result = autotune_preset(forge.load_preset("demo"), max_memory="200MB")
        >>> print(format_table(result))
    """
    from forge.modeling import load_model, load_tokenizer
    from forge.runner import load_datasets

    section = preset.config.get("autotune")
    section = {"enabled": section} if isinstance(section, bool) else dict(section or {})
    if max_memory is not None:
        section["max_memory"] = max_memory
    if target_global_batch is not None:
        section["target_global_batch"] = target_global_batch
    try:
        cfg = AutotuneConfig(**section)
    except ValueError as err:
        raise ForgeError(str(err)) from None
    args = preset.training_args()
    train_ds, eval_ds = load_datasets(preset)
    tokenizer = load_tokenizer(preset.model)
    model = load_model(preset.model, preset.quantization_config(), preset.peft_config())
    _place_for_training(model, args)
    evaluating = eval_ds is not None or _evaluating(args)
    return _tune_for_preset(cfg, model, args, train_ds, tokenizer, evaluating, apply=False)
