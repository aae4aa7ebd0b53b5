"""One real step at a given batch size, and the memory it needed: the probes of :mod:`forge.autotune`.

Two ways to measure, same step:

* ``cuda``: the allocator's own high-water mark (``torch.cuda.max_memory_allocated``) after a
  forward, backward and optimizer step; an out-of-memory error is caught and reported as a
  failed probe, with memory freed before the next one.
* ``accounting`` (any device, the CPU included): the bytes a training step keeps alive at its
  steady-state peak, counted exactly: parameters and buffers, activations autograd saves for
  backward (through ``torch.autograd.graph.saved_tensors_hooks``), gradients and optimizer
  state. Evaluation, which saves nothing, is counted as the high-water mark of tensors created
  during the forward (a ``TorchDispatchMode``). Allocator fragmentation and short-lived
  workspace are not in it; the search's safety margin is for those.

The optimizer runs with ``lr=0`` so the probes leave the weights bit-for-bit unchanged. The
helpers at the end read from ``TrainingArguments`` what the probes must imitate: the
optimizer, mixed precision, gradient checkpointing, the world size and the budget.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from forge.core.memory import LiveBytes

OOM_MARKERS = ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED",
               "CUDNN_STATUS_NOT_SUPPORTED", "DefaultCPUAllocator")

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def is_oom(err: BaseException) -> bool:
    """Whether an exception is an out-of-memory error (CUDA, cuBLAS/cuDNN or host)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in OOM_MARKERS)


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return id(t), t.numel() * t.element_size()


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights and views count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            key, nbytes = _storage_key(t)
            seen[key] = nbytes
    return sum(seen.values())


def model_bytes(model: nn.Module) -> int:
    """Parameters and buffers of a model, each storage once."""
    return storage_bytes([*model.parameters(), *model.buffers()])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (moments, step counters)."""
    return storage_bytes(v for state in optimizer.state.values() for v in state.values())


class StepProbe:
    """Callable ``probe(batch) -> peak bytes | None``: one real step of ``model`` at a batch size.

    Args:
        model: the model as it will train (PEFT-wrapped, quantized, on its device).
        seq_len: tokens per row; probe rows are random token ids of this length.
        mode: ``"cuda"`` (allocator high-water mark, OOM caught) or ``"accounting"``.
        train: a training step (forward, backward, optimizer step) or an evaluation forward.
        optimizer_factory: builds the run's optimizer over the trainable parameters with
            ``lr=0``; default AdamW.
        autocast_dtype: mixed-precision dtype the run uses (bf16/fp16), or None.
        rows_per_example: sequences per example (2 for DPO's chosen and rejected).

    Example:
        >>> probe = StepProbe(model, seq_len=128, mode="accounting")
        >>> probe(4) > probe(2)      # bytes of one training step at batch 4 and at 2
        True
    """

    def __init__(
        self,
        model: nn.Module,
        seq_len: int,
        *,
        mode: str = "accounting",
        train: bool = True,
        optimizer_factory: OptimizerFactory | None = None,
        autocast_dtype: torch.dtype | None = None,
        rows_per_example: int = 1,
    ) -> None:
        self.model = model
        self.seq_len = seq_len
        self.mode = mode
        self.train = train
        self.optimizer_factory = optimizer_factory or (lambda ps: torch.optim.AdamW(ps, lr=0.0))
        self.autocast_dtype = autocast_dtype
        self.rows_per_example = rows_per_example
        first = next(model.parameters())
        self.device = first.device
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_size = int(getattr(embeddings, "num_embeddings", 0) or model.config.vocab_size)
        self.optimizer_bytes = 0  # state of the last training probe's optimizer

    def _batch(self, batch: int) -> dict[str, torch.Tensor]:
        # A private generator: probing must not move the global RNG the run is seeded with.
        gen = torch.Generator(device="cpu").manual_seed(batch)
        ids = torch.randint(0, self.vocab_size, (batch * self.rows_per_example, self.seq_len), generator=gen)
        ids = ids.to(self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _loss(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(**inputs)
        return out.loss if hasattr(out, "loss") else out[0]

    def _train_step(self, batch: int) -> int:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("autotune: the model has no trainable parameters")
        inputs = self._batch(batch)
        optimizer = self.optimizer_factory(params)
        saved: dict[int, Any] = {}
        fixed = {_storage_key(t)[0] for t in [*self.model.parameters(), *self.model.buffers()]}

        def pack(t: torch.Tensor) -> torch.Tensor:
            key, _ = _storage_key(t)
            if key not in fixed:
                # A strong reference, so a freed storage's address cannot be reused and
                # mistaken for one already counted while the forward runs.
                saved[key] = t
            return t

        hooks = (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
                 if self.mode == "accounting" else contextlib.nullcontext())
        with self._autocast(), hooks:
            loss = self._loss(inputs)
        activations = storage_bytes(saved.values())
        saved.clear()
        loss.backward()
        del loss
        grads = storage_bytes(p.grad for p in params if p.grad is not None)
        optimizer.step()
        self.optimizer_bytes = optimizer_state_bytes(optimizer)
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        # Steady state of a run: weights, optimizer state and gradients stay allocated while
        # the next micro-batch's forward saves its activations.
        return model_bytes(self.model) + self.optimizer_bytes + grads + activations

    def _eval_step(self, batch: int) -> int:
        inputs = self._batch(batch)
        tracker = LiveBytes() if self.mode == "accounting" else contextlib.nullcontext()
        with torch.no_grad(), self._autocast(), tracker:
            loss = self._loss(inputs)
            del loss
        return model_bytes(self.model) + (tracker.peak if isinstance(tracker, LiveBytes) else 0)

    def __call__(self, batch: int) -> int | None:
        was_training = self.model.training
        self.model.train(self.train)
        cuda = self.mode == "cuda"
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        failed = False
        try:
            counted = self._train_step(batch) if self.train else self._eval_step(batch)
            if cuda:
                torch.cuda.synchronize(self.device)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            if not is_oom(err):
                raise
            failed = True
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.train(was_training)
        # Outside the except block: the traceback that held the step's tensors is gone now.
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            gc.collect()
            torch.cuda.empty_cache()
            return None if failed else peak
        return None if failed else counted


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
