"""One real step at a given batch size, and the memory it needed: the probes of :mod:`forge.autotune`.

The measurement is forge's one memory model, :class:`forge.core.memory.StepMemory` (the same
that ``suggest_freeze`` uses): a real steady-state step (forward, backward, clipping and the
optimizer step, the optimizer state allocated by a warm-up step, the previous micro-batch's
gradients alive under accumulation) measured on CUDA by the allocator's peak
(``torch.cuda.max_memory_allocated``) and elsewhere by the high-water mark of live tensors
(:class:`~forge.core.memory.LiveBytes`), with weights, optimizer state and held gradients
added explicitly. An out-of-memory error is caught and reported as a failed probe, with
memory freed before the next one.

The optimizer runs with ``lr=0`` so the probes leave the weights bit-for-bit unchanged. The
helpers at the end read from ``TrainingArguments`` what the probes must imitate: the
optimizer, mixed precision, gradient checkpointing, clipping, the world size and the budget.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from forge.core.memory import (
    OptimizerFactory,
    StepMemory,
    model_bytes,
    optimizer_state_bytes,
    storage_bytes,
)

__all__ = ["StepProbe", "is_oom", "model_bytes", "optimizer_state_bytes", "storage_bytes"]

OOM_MARKERS = ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED",
               "CUDNN_STATUS_NOT_SUPPORTED", "DefaultCPUAllocator")


def is_oom(err: BaseException) -> bool:
    """Whether an exception is an out-of-memory error (CUDA, cuBLAS/cuDNN or host)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in OOM_MARKERS)


class StepProbe:
    """Callable ``probe(batch) -> peak bytes | None``: one real step of ``model`` at a batch size.

    Args:
        model: the model as it will train (PEFT-wrapped, quantized, frozen, on its device).
        seq_len: tokens per row; probe rows are random token ids of this length.
        train: a training step (forward, backward, optimizer step) or an evaluation forward.
        optimizer_factory: builds the run's optimizer over the trainable parameters with
            ``lr=0``; default AdamW.
        autocast_dtype: mixed-precision dtype the run uses (bf16/fp16), or None.
        rows_per_example: sequences per example (2 for DPO's chosen and rejected).
        accumulation_steps: above 1, the previous micro-batch's gradients are held during
            the measured step (as under gradient accumulation).
        max_grad_norm: the run's gradient clipping (None: none).

    Attributes:
        optimizer_bytes: the optimizer state the training probes hold.
        last: the :class:`~forge.core.memory.StepPeak` of the last probe that ran.

    Example:
        >>> probe = StepProbe(model, seq_len=128)
        >>> probe(4) > probe(2)      # bytes of one training step at batch 4 and at 2
        True
        >>> probe.release()          # free the probes' optimizer state
    """

    def __init__(
        self,
        model: nn.Module,
        seq_len: int,
        *,
        train: bool = True,
        optimizer_factory: OptimizerFactory | None = None,
        autocast_dtype: torch.dtype | None = None,
        rows_per_example: int = 1,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
    ) -> None:
        self.model = model
        self.seq_len = seq_len
        self.train = train
        self.rows_per_example = rows_per_example
        self.memory = StepMemory(model, optimizer_factory=optimizer_factory, accumulation_steps=accumulation_steps,
                                 max_grad_norm=max_grad_norm, autocast_dtype=autocast_dtype)
        self.device = self.memory.device
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_size = int(getattr(embeddings, "num_embeddings", 0) or model.config.vocab_size)
        self.optimizer_bytes = 0
        self.last = None

    @property
    def mode(self) -> str:
        """``cuda`` (the allocator's peak) or ``live`` (the live-tensor high-water mark)."""
        return "cuda" if self.memory.cuda else "live"

    def _batch(self, batch: int) -> dict[str, torch.Tensor]:
        # A private generator: probing must not move the global RNG the run is seeded with.
        gen = torch.Generator(device="cpu").manual_seed(batch)
        ids = torch.randint(0, self.vocab_size, (batch * self.rows_per_example, self.seq_len), generator=gen)
        ids = ids.to(self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def release(self) -> None:
        """Free the optimizer state the training probes hold."""
        self.memory.release()

    def __call__(self, batch: int) -> int | None:
        found = self.measure(batch)
        return None if found is None else found[0]

    def measure(self, batch: int) -> tuple[int, int] | None:
        """``(peak bytes, forward/backward peak bytes)`` of one step, or None when it ran out
        of memory: what :func:`~forge.autotune.search.search_batch_size` fits its line on."""
        was_training = self.model.training
        self.model.train(self.train)
        cuda = self.memory.cuda
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
        peak = None
        try:
            inputs = self._batch(batch)
            peak = self.memory.measure(inputs) if self.train else self.memory.measure_eval(inputs)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            if not is_oom(err):
                raise
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.train(was_training)
        # Outside the except block: the traceback that held the step's tensors is gone now.
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
        if peak is None:
            return None
        self.last = peak
        self.optimizer_bytes = peak.optimizer_bytes
        return peak.peak_bytes, peak.forward_backward_bytes


# -- the run the probes imitate ------------------------------------------------------------
def is_trainer(obj: Any) -> bool:
    """Duck-typed: a transformers ``Trainer`` (or a TRL trainer built on it)."""
    return hasattr(obj, "args") and hasattr(obj, "model") and hasattr(obj, "create_optimizer")


def world_size_of(args: Any) -> int:
    """Data-parallel replicas: processes, times GPUs under single-process DataParallel."""
    if args is not None:
        # DataParallel (several GPUs, one process) multiplies the batch like extra processes.
        return int(args.world_size) * max(1, int(getattr(args, "n_gpu", 1) or 1))
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def optimizer_factory(args: Any, model: nn.Module) -> OptimizerFactory | None:
    """The optimizer the Trainer would build from ``args`` (class and kwargs), at ``lr=0``."""
    if args is None:
        return None
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    # lr=0: the probes' optimizer steps allocate the real state but leave the weights alone.
    kwargs = {**kwargs, "lr": 0.0}
    return lambda params: cls(params, **kwargs)


def autocast_dtype(args: Any) -> torch.dtype | None:
    """The mixed-precision dtype ``args`` asks for (bf16/fp16), or None."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return None


@contextlib.contextmanager
def as_trained(model: nn.Module, args: Any, device: torch.device) -> Iterator[None]:
    """Activation checkpointing as the run will have it, and the RNG streams left untouched.

    Mirrors what the Trainer does at construction (transformers 5 names first, the
    deprecated ``gradient_checkpointing*`` ones as a fallback).
    """
    want = bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False))
    new_api = hasattr(model, "activation_checkpointing_enable")
    already = getattr(model, "is_activation_checkpointing" if new_api else "is_gradient_checkpointing", False)
    enable = want and not already and (new_api or hasattr(model, "gradient_checkpointing_enable"))
    if enable:
        kwargs = dict(getattr(args, "activation_checkpointing_kwargs", None)
                      or getattr(args, "gradient_checkpointing_kwargs", None) or {})
        every, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        if new_api:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None,
                                                  every_n_layers=every, offload=offload)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        if enable:
            (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()


def budget_bytes(max_memory: int | str | None, device: torch.device) -> int:
    """Bytes a step may use on ``device``: ``max_memory`` parsed, or CUDA's free memory."""
    from forge.autotune.data import parse_memory
    from forge.errors import ForgeError

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if max_memory is None:
            # Free memory plus what this process's allocator already holds (weights included,
            # since the allocator's peak counts them too).
            return free + torch.cuda.memory_reserved(device)
        return parse_memory(max_memory, total=total)
    if max_memory is None:
        raise ForgeError(f"autotune: the model is on '{device}', where free memory cannot be read; "
                         "give max_memory (e.g. --max-memory 8GB or autotune.max_memory: 8GB)")
    return parse_memory(max_memory)


def agree_across_ranks(batch: int, device: torch.device) -> int:
    """The smallest choice over all processes, so every rank trains with the same batch."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return batch
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([batch], device=on)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())
