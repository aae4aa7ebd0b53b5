"""Forge's one memory model: the high-water mark of a real training step, on any device.

Both :func:`forge.autotune.autotune_batch_size` and :func:`forge.layers.suggest_freeze` measure
memory here, the same way:

* a **real step**: forward, backward, gradient clipping and the optimizer step, with the
  optimizer the run builds (at ``lr=0``, so the weights do not move);
* at **steady state**: the optimizer state is allocated by a warm-up step first (the first
  step of a run has no state during its forward and backward; every later one has), and with
  gradient accumulation the gradients of the previous micro-batch are alive during the next;
* **measured, not added up**: on CUDA the allocator's own peak
  (``torch.cuda.max_memory_allocated``); on the CPU and any other device :class:`LiveBytes`,
  the high-water mark of every tensor storage the step creates (forward, backward and
  optimizer kernels alike, the transients that a sum of categories misses included);
* **persistent bytes added explicitly**: weights, buffers, optimizer state, held gradients and
  the batch exist before the step, so :class:`StepPeak` adds them to what the step created.

Example:
    >>> memory = StepMemory(model)                     # AdamW at lr=0 unless told otherwise
    >>> peak = memory.measure(batch)                   # one steady-state training step
    >>> peak.peak_bytes, peak.persistent_bytes, peak.phases
    (118_200_000, 1_900_000, {'forward_backward': 116_300_000, 'optimizer': 1_700_000})
    >>> memory.release()                               # frees the optimizer state
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]

FORWARD_BACKWARD = "forward_backward"
OPTIMIZER = "optimizer"


class LiveBytes(TorchDispatchMode):
    """Track live and peak bytes of tensor storages created inside the context.

    It sits under autograd as a ``TorchDispatchMode``, so forward, backward and optimizer
    kernels are all seen, and a storage is subtracted when it is freed, wherever that happens.

    Args:
        ignore: tensors that already exist (parameters, inputs); views of them are not counted.

    Example:
        >>> with LiveBytes() as live:
        ...     x = torch.ones(1024)          # 4 KiB
        ...     del x
        >>> live.peak, live.live
        (4096, 0)
    """

    def __init__(self, ignore: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._ignore = {t.untyped_storage()._cdata for t in ignore}
        self._refs: dict[int, Any] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)

    def reset_peak(self) -> None:
        """Start a new peak measurement from the current live bytes."""
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._refs or key in self._ignore:
                continue
            nbytes = storage.nbytes()
            self.live += nbytes
            # The callback fires when the storage dies, wherever that happens.
            self._refs[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n))
        self.peak = max(self.peak, self.live)
        return out


# -- bytes of what exists ------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return id(t), t.numel() * t.element_size()


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights and views count once).

    Example:
        >>> w = torch.zeros(256)
        >>> storage_bytes([w, w[:10], w.view(16, 16)])
        1024
    """
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            key, nbytes = _storage_key(t)
            seen[key] = nbytes
    return sum(seen.values())


def model_bytes(model: nn.Module) -> int:
    """Parameters and buffers of a model, each storage once."""
    return storage_bytes([*model.parameters(), *model.buffers()])


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors an optimizer keeps per parameter (moments, step counters)."""
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (moments, step counters)."""
    return storage_bytes(optimizer_tensors(optimizer))


# -- the measurement -----------------------------------------------------------------------------
@dataclass
class StepPeak:
    """The memory one steady-state step needed.

    Attributes:
        peak_bytes: the high-water mark of the step, persistent bytes included; on CUDA the
            allocator's peak (everything this process holds on the device).
        persistent_bytes: what existed before the step: ``weights_bytes + optimizer_bytes +
            held_grads_bytes + inputs_bytes``.
        weights_bytes: parameters and buffers.
        optimizer_bytes: optimizer state (allocated by the warm-up step).
        held_grads_bytes: gradients of the previous micro-batch (accumulation > 1), else 0.
        inputs_bytes: the batch.
        phases: the high-water mark above ``persistent_bytes`` in each phase:
            ``forward_backward`` and ``optimizer`` (clipping and the step; gradients included).
        grads_bytes: the gradients the step produced.
        source: ``"live tensors"`` (:class:`LiveBytes`) or ``"cuda allocator"``.
    """

    peak_bytes: int
    persistent_bytes: int
    weights_bytes: int
    optimizer_bytes: int = 0
    held_grads_bytes: int = 0
    inputs_bytes: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    grads_bytes: int = 0
    source: str = "live tensors"

    @property
    def forward_backward_bytes(self) -> int:
        """The peak of the forward and backward alone (persistent bytes included): the part that
        grows with the batch, where the whole peak may sit on the optimizer step at small batches."""
        phase = self.phases.get(FORWARD_BACKWARD, self.phases.get("forward", 0))
        return self.peak_bytes - max(self.phases.values(), default=0) + phase


def _adam_at_lr0(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=0.0)


def _model_loss(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    loss = out.loss if hasattr(out, "loss") else out[0]
    if loss is None:
        raise ValueError("memory: the model returned no loss; pass a batch with labels")
    return loss


class StepMemory:
    """Measure the memory of real training steps of ``model`` at steady state.

    Create it on the model as it will train (on its device, frozen parts frozen, PEFT and
    activation checkpointing as the run has them). The optimizer it builds keeps its state
    between measurements, as a run does; :meth:`release` frees it.

    Args:
        model: the model.
        optimizer_factory: builds the run's optimizer over the trainable parameters, with
            ``lr=0`` so the weights stay bit-for-bit unchanged; default AdamW.
        accumulation_steps: micro-batches per optimizer step; above 1 the previous
            micro-batch's gradients are held during the measured one.
        max_grad_norm: clip the gradients as the Trainer does (None or 0: no clipping).
        autocast_dtype: the run's mixed-precision dtype (bf16/fp16), or None.
        loss_fn: ``loss_fn(model, inputs) -> loss``; default the model's own loss.

    Example:
        >>> memory = StepMemory(model, accumulation_steps=4)
        >>> memory.measure(batch).peak_bytes       # the last micro-batch of a window, then the step
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer_factory: OptimizerFactory | None = None,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        autocast_dtype: torch.dtype | None = None,
        loss_fn: LossFn | None = None,
    ) -> None:
        self.model = model
        self.optimizer_factory = optimizer_factory or _adam_at_lr0
        self.accumulation_steps = max(1, int(accumulation_steps))
        self.max_grad_norm = max_grad_norm or None
        self.autocast_dtype = autocast_dtype
        self.loss_fn = loss_fn or _model_loss
        self.device = next(model.parameters()).device
        self.optimizer: torch.optim.Optimizer | None = None
        self._params: list[nn.Parameter] = []

    @property
    def cuda(self) -> bool:
        """Whether the allocator's peak is read (the model is on a CUDA device)."""
        return self.device.type == "cuda"

    @property
    def optimizer_bytes(self) -> int:
        """The optimizer state held now (0 before the first measurement)."""
        return optimizer_state_bytes(self.optimizer) if self.optimizer is not None else 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def warm_up(self) -> None:
        """Build the optimizer and let one step allocate its state (zero gradients, ``lr=0``).

        Called by :meth:`measure`; again only when the trainable parameters changed.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("memory: the model has no trainable parameters")
        if self.optimizer is not None and len(params) == len(self._params) \
                and all(a is b for a, b in zip(params, self._params)):
            return
        self.release()
        self._params = params
        self.optimizer = self.optimizer_factory(params)
        saved = [p.grad for p in params]
        try:
            for p in params:
                p.grad = torch.zeros_like(p)
            # A step on zero gradients allocates exactly the state a real one would.
            self.optimizer.step()
        finally:
            for p, g in zip(params, saved):
                p.grad = g

    def release(self) -> None:
        """Free the optimizer and its state."""
        self.optimizer = None
        self._params = []

    def measure(
        self,
        inputs: Mapping[str, torch.Tensor],
        *,
        forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
        after_backward: Callable[[], None] | None = None,
    ) -> StepPeak:
        """One steady-state training step on ``inputs``; the gradients are freed afterwards.

        Args:
            inputs: the batch, on the model's device, with labels.
            forward_context: wraps the forward (e.g. saved-tensor hooks of a caller).
            after_backward: called between backward and the optimizer step (the gradients
                of this step are there), e.g. to read gradient norms.

        Returns:
            A :class:`StepPeak`.

        Raises:
            torch.cuda.OutOfMemoryError, RuntimeError: as the step raises them.
        """
        self.warm_up()
        params, optimizer = self._params, self.optimizer
        held = []
        if self.accumulation_steps > 1:
            # The previous micro-batch's gradients, alive through this one's forward and backward.
            for p in params:
                p.grad = torch.zeros_like(p)
            held = [p.grad for p in params]
        state = optimizer_tensors(optimizer)
        inputs_list = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
        weights = model_bytes(self.model)
        opt_bytes, held_bytes, in_bytes = storage_bytes(state), storage_bytes(held), storage_bytes(inputs_list)
        persistent = weights + opt_bytes + held_bytes + in_bytes
        existing = [*self.model.parameters(), *self.model.buffers(), *state, *held, *inputs_list]
        tracker = _Peaks(self.cuda, self.device, existing)
        try:
            with tracker:
                with self._autocast(), (forward_context or contextlib.nullcontext)():
                    loss = self.loss_fn(self.model, inputs)
                (loss / self.accumulation_steps).backward()
                del loss
                grads = storage_bytes(p.grad for p in params if p.grad is not None)
                if after_backward is not None:
                    after_backward()
                tracker.phase(FORWARD_BACKWARD)
                if self.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                optimizer.step()
                tracker.phase(OPTIMIZER)
        finally:
            del held
            for p in params:
                p.grad = None
        phases = tracker.phases
        peak = tracker.absolute_peak if self.cuda else persistent + max(phases.values())
        return StepPeak(peak_bytes=peak, persistent_bytes=persistent, weights_bytes=weights,
                        optimizer_bytes=opt_bytes, held_grads_bytes=held_bytes, inputs_bytes=in_bytes,
                        phases=phases, grads_bytes=grads, source=tracker.source)

    def measure_eval(self, inputs: Mapping[str, torch.Tensor]) -> StepPeak:
        """One evaluation forward (``no_grad``): weights and the batch, plus what it creates.

        The optimizer state is not part of it (see :meth:`measure` for a training step).
        """
        inputs_list = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
        weights, in_bytes = model_bytes(self.model), storage_bytes(inputs_list)
        tracker = _Peaks(self.cuda, self.device, [*self.model.parameters(), *self.model.buffers(), *inputs_list])
        with tracker, torch.no_grad(), self._autocast():
            loss = self.loss_fn(self.model, inputs)
            del loss
            tracker.phase("forward")
        peak = tracker.absolute_peak if self.cuda else weights + in_bytes + tracker.phases["forward"]
        return StepPeak(peak_bytes=peak, persistent_bytes=weights + in_bytes, weights_bytes=weights,
                        inputs_bytes=in_bytes, phases=tracker.phases, source=tracker.source)


class _Peaks:
    """Per-phase high-water marks above what existed at entry: :class:`LiveBytes`, or the CUDA
    allocator's peak statistics."""

    def __init__(self, cuda: bool, device: torch.device, existing: list[torch.Tensor]) -> None:
        self.cuda, self.device = cuda, device
        self.phases: dict[str, int] = {}
        self.absolute_peak = 0
        self.source = "cuda allocator" if cuda else "live tensors"
        self._live = None if cuda else LiveBytes(ignore=existing)
        self._base = 0

    def __enter__(self) -> _Peaks:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._live.__enter__()
        return self

    def phase(self, name: str) -> None:
        """Close a phase: record its high-water mark and start the next from the live bytes."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            top = torch.cuda.max_memory_allocated(self.device)
            self.absolute_peak = max(self.absolute_peak, top)
            self.phases[name] = top - self._base
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.phases[name] = self._live.peak
            self._live.reset_peak()

    def __exit__(self, *exc: Any) -> None:
        if not self.cuda:
            self._live.__exit__(*exc)
