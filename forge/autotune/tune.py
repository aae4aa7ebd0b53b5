"""``autotune_batch_size``: the search on a built Trainer or a bare model (plain PyTorch probes)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from torch import nn

from forge.autotune.data import format_bytes, is_preference, sequence_length
from forge.autotune.probe import (
    StepProbe,
    agree_across_ranks,
    as_trained,
    autocast_dtype,
    budget_bytes,
    is_trainer,
    optimizer_factory,
    storage_bytes,
    world_size_of,
)
from forge.autotune.result import AutotuneCallback, AutotuneResult, load_choice
from forge.autotune.search import (
    accumulation_for,
    search_batch_size,
    split_global_batch,
)
from forge.errors import ForgeError

__all__ = ["autotune_batch_size"]

DEFAULT_MAX_BATCH = 1024  # cap when there is no target global batch to cap at


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
    reserved = int(reserved_bytes)
    if world > 1:
        # DDP keeps a gradient-sized bucket copy of the trainable parameters.
        reserved += storage_bytes(p for p in model.parameters() if p.requires_grad)
    budget = budget_bytes(max_memory, device) - reserved
    cap = math.ceil(target / world) if target is not None else DEFAULT_MAX_BATCH
    cap = min(cap, max_batch) if max_batch else cap
    # Whenever the target may need accumulation, the probes hold the previous micro-batch's
    # gradients through the step, as every micro-batch after the first of a window does.
    accumulating = target is not None and math.ceil(target / world) > 1
    probe = StepProbe(model, seq_len, optimizer_factory=optimizer_factory(args, model),
                      autocast_dtype=autocast_dtype(args), rows_per_example=rows,
                      accumulation_steps=2 if accumulating else 1,
                      max_grad_norm=getattr(args, "max_grad_norm", None))
    try:
        with as_trained(model, args, device):
            outcome = search_batch_size(measure or probe.measure, budget, cap=cap, margin=margin,
                                        pick=lambda limit: split_global_batch(limit, target, world)[0])
    finally:
        probe.release()
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
        safety_margin=margin, mode=probe.mode, probes=outcome.probes, fit=outcome.fit,
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
    probe = StepProbe(model, seq_len, train=False, autocast_dtype=autocast_dtype(args), rows_per_example=rows)
    # The Trainer evaluates mid-run, with the optimizer state still allocated.
    result.eval_budget = result.budget - result.optimizer_bytes
    with as_trained(model, args, device):
        found = search_batch_size(measure or probe.measure, result.eval_budget, cap=cap,
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
