"""Private measurement helpers for :mod:`forge.layers.suggest`, on forge's one memory model
(:class:`forge.core.memory.StepMemory`, the same that autotune uses)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from forge.core.memory import OPTIMIZER, OptimizerFactory, StepMemory, StepPeak, storage_bytes


@dataclass
class ProbeResult:
    """What one real training step with every schedulable parameter trainable measured."""

    step: StepPeak  # the step's memory: persistent bytes and each phase's high-water mark
    saved: dict[str, int]  # activation bytes autograd saved, by group (embeddings/block.i/top)
    state_bytes: dict[str, int] = field(default_factory=dict)  # optimizer state, by parameter name
    grad_norm: dict[str, float] = field(default_factory=dict)  # by group
    weight_norm: dict[str, float] = field(default_factory=dict)  # by group, trainable params only

    @property
    def step_transient(self) -> int:
        """What the clipping and optimizer step create beyond the gradients (their temporaries)."""
        return max(self.step.phases[OPTIMIZER] - self.step.grads_bytes, 0)


def group_order(num_blocks: int) -> dict[str, int]:
    """Input-to-output position of each group: vision and embeddings 0, block i -> i + 1, rest n + 1."""
    order = {"vision": 0, "embeddings": 0, **{f"block.{i}": i + 1 for i in range(num_blocks)}}
    order.update(dict.fromkeys(("norm", "head", "other"), num_blocks + 1))
    return order


@contextlib.contextmanager
def _attribute_saved(
    module_groups: dict[str, list[nn.Module]], order: dict[str, int], fixed: set[int], saved: dict[int, tuple[int, str]]
) -> Iterator[None]:
    """Record which group's forward saved each activation for backward."""
    owner = ["other"]  # group of the module currently running forward
    handles = []
    for key, modules in module_groups.items():
        for module in modules:
            handles.append(module.register_forward_pre_hook(lambda m, a, k=key: owner.append(k)))
            handles.append(module.register_forward_hook(lambda m, a, o: owner.pop() and None))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in fixed:
            # A tensor saved by several groups stays alive while the topmost one needs it.
            prev = saved.get(key)
            if prev is None or order[owner[-1]] > order[prev[1]]:
                saved[key] = (storage.nbytes(), owner[-1])
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for h in handles:
            h.remove()


def probe_step(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    groups: dict[str, tuple[str, ...]],
    module_groups: dict[str, list[nn.Module]],
    num_blocks: int,
    optimizer_factory: OptimizerFactory | None = None,
) -> ProbeResult:
    """Run one real training step and measure its memory, the activations saved per group, the
    optimizer state per parameter and the gradient norms per group.

    The caller has set ``requires_grad`` for the probe and restores state afterwards.
    """
    order = group_order(num_blocks)
    saved: dict[int, tuple[int, str]] = {}
    fixed = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    named = dict(model.named_parameters())
    grad_norm: dict[str, float] = {}
    weight_norm: dict[str, float] = {}

    def norms() -> None:
        with torch.no_grad():
            for key, names in groups.items():
                ps = [named[n] for n in names if named[n].grad is not None]
                if ps:
                    grad_norm[key] = float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in ps])))
                    weight_norm[key] = float(torch.linalg.vector_norm(torch.stack([p.float().norm() for p in ps])))

    def context() -> contextlib.AbstractContextManager:
        return _attribute_saved(module_groups, order, fixed, saved)

    memory = StepMemory(model, optimizer_factory=optimizer_factory)
    try:
        step = memory.measure(batch, forward_context=context, after_backward=norms)
        by_param = {id(p): storage_bytes(s.values()) for p, s in memory.optimizer.state.items()}
        state_bytes = {n: by_param.get(id(p), 0) for n, p in named.items()}
    finally:
        memory.release()
    by_group: dict[str, int] = {}
    for nbytes, key in saved.values():
        by_group[key] = by_group.get(key, 0) + nbytes
    return ProbeResult(step, by_group, state_bytes, grad_norm, weight_norm)
