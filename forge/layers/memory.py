"""Private measurement helpers for :mod:`forge.layers.suggest` (tensor bytes via
:class:`forge.core.memory.LiveBytes`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from forge.core.memory import LiveBytes


@dataclass
class ProbeResult:
    """What one forward+backward with every schedulable parameter trainable measured."""

    peak_bytes: int  # tensor high-water mark of forward+backward (excludes weights)
    saved: dict[str, int]  # activation bytes autograd saved, by group (embeddings/block.i/top)
    grad_norm: dict[str, float] = field(default_factory=dict)  # by group
    weight_norm: dict[str, float] = field(default_factory=dict)  # by group, trainable params only


def group_order(num_blocks: int) -> dict[str, int]:
    """Input-to-output position of each group: embeddings 0, block i -> i + 1, rest n + 1."""
    order = {"embeddings": 0, **{f"block.{i}": i + 1 for i in range(num_blocks)}}
    order.update(dict.fromkeys(("norm", "head", "other"), num_blocks + 1))
    return order


def probe_step(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    groups: dict[str, tuple[str, ...]],
    module_groups: dict[str, list[nn.Module]],
    num_blocks: int,
) -> ProbeResult:
    """Run forward+backward once and measure saved activations per group and gradient norms.

    The caller has set ``requires_grad`` for the probe and restores state afterwards.
    """
    order = group_order(num_blocks)
    owner = ["other"]  # group of the module currently running forward
    handles = []
    for key, modules in module_groups.items():
        for module in modules:
            handles.append(module.register_forward_pre_hook(lambda m, a, k=key: owner.append(k)))
            handles.append(module.register_forward_hook(lambda m, a, o: owner.pop() and None))
    params = list(model.parameters())
    param_storages = {p.untyped_storage()._cdata for p in params}
    saved: dict[int, tuple[int, str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in param_storages:
            # A tensor saved by several groups stays alive while the topmost one needs it.
            prev = saved.get(key)
            if prev is None or order[owner[-1]] > order[prev[1]]:
                saved[key] = (storage.nbytes(), owner[-1])
        return t

    tracker = LiveBytes(ignore=[*params, *model.buffers(), *batch.values()])
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker:
            loss = model(**batch).loss
            if loss is None:
                raise ValueError("suggest_freeze: the model returned no loss; pass a batch with labels")
            loss.backward()
            del loss
    finally:
        for h in handles:
            h.remove()
    by_group: dict[str, int] = {}
    for nbytes, key in saved.values():
        by_group[key] = by_group.get(key, 0) + nbytes
    named = dict(model.named_parameters())
    grad_norm, weight_norm = {}, {}
    for key, names in groups.items():
        ps = [named[n] for n in names if named[n].grad is not None]
        if ps:
            grad_norm[key] = float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in ps])))
            weight_norm[key] = float(torch.linalg.vector_norm(torch.stack([p.detach().float().norm() for p in ps])))
    return ProbeResult(tracker.peak, by_group, grad_norm, weight_norm)


@dataclass
class OptimizerProfile:
    """Optimizer memory measured on dummy tensors: state per element/tensor and step transient."""

    state_per_element: float  # state bytes per parameter element
    state_per_tensor: float  # fixed state bytes per parameter tensor (step counters)
    transient_per_element: float  # extra bytes per element during step() for the largest tensor

    def state_bytes(self, numels: Iterable[int]) -> int:
        """Optimizer state held for parameters with these element counts."""
        numels = list(numels)
        return int(self.state_per_element * sum(numels) + self.state_per_tensor * len(numels))


def optimizer_profile(
    optimizer_cls: type[torch.optim.Optimizer],
    optimizer_kwargs: dict[str, Any],
    dtype: torch.dtype,
    device: torch.device,
    sizes: tuple[int, int] = (1 << 12, 1 << 14),
) -> OptimizerProfile:
    """Measure what ``optimizer_cls`` keeps per element and per tensor, and its step transient."""
    states, transients = [], []
    for n in sizes:
        p = nn.Parameter(torch.zeros(n, dtype=dtype, device=device))
        p.grad = torch.ones_like(p)
        opt = optimizer_cls([p], **optimizer_kwargs)
        tracker = LiveBytes(ignore=[p, p.grad])
        with tracker:
            opt.step()  # first step allocates the state
            tracker.reset_peak()
            opt.step()  # second step shows the steady-state temporaries
        states.append(tracker.live)
        transients.append(tracker.peak - tracker.live)
        del opt, p
    (n1, n2), (s1, s2) = sizes, states
    per_element = (s2 - s1) / (n2 - n1)
    return OptimizerProfile(
        state_per_element=per_element,
        state_per_tensor=max(s1 - per_element * n1, 0.0),
        transient_per_element=max(transients[1], 0) / n2,
    )
