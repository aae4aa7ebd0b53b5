"""The tensor bookkeeping behind :class:`forge.ema.EMAWeights`: which tensors, grouped how.

Private. A :class:`Plan` pairs each EMA tensor with the live model tensor it follows and groups
the pairs so one update is a handful of ``torch._foreach_*`` calls, not a Python loop over
parameters. Plans are cached per model object; building one walks the module tree once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from forge.core.distributed import local_view, shard_spec
from forge.core.trainable import trainable_set

_HAS_FOREACH_LERP = hasattr(torch, "_foreach_lerp_")


def tracked_tensors(model: nn.Module, include_frozen: bool, include_buffers: bool) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for everything the EMA follows, in module order.

    Floating-point parameters that train at some point of the run (the model's
    :class:`~forge.core.trainable.TrainableSet` universe: trainable now, or declared by a freeze
    schedule that switches them on later); frozen ones too with ``include_frozen`` (quantized
    integer weights, e.g. bitsandbytes 4-bit, are never averaged); with ``include_buffers`` all
    buffers (floating ones averaged, integer ones such as BatchNorm's counter copied).
    Tied parameters appear once, under their first name.
    """
    universe = set(trainable_set(model).universe)
    out = [
        (name, p)
        for name, p in model.named_parameters()
        if p.is_floating_point() and (include_frozen or p.requires_grad or name in universe)
    ]
    if include_buffers:
        out.extend(model.named_buffers())
    return out


def blend_(dst: list[torch.Tensor], src: list[torch.Tensor], weight: float, same_dtype: bool) -> None:
    """``dst += weight * (src - dst)`` for every pair; ``weight == 1`` is an exact copy."""
    if not dst:
        return
    if weight == 1.0:
        torch._foreach_copy_(dst, src)
    elif same_dtype and _HAS_FOREACH_LERP:
        torch._foreach_lerp_(dst, src, weight)
    elif same_dtype:  # torch without _foreach_lerp_
        for d, s in zip(dst, src, strict=True):
            d.lerp_(s, weight)
    else:
        # lerp_ needs one dtype; add_ promotes inside the kernel, so no cast copy of the model.
        torch._foreach_mul_(dst, 1.0 - weight)
        torch._foreach_add_(dst, src, alpha=weight)


@dataclass
class Group:
    """Pairs that can share one foreach call."""

    index: list[int]
    shadow: list[torch.Tensor]
    same_dtype: bool
    average: bool  # False: integer buffers, always copied
    staging: list[torch.Tensor] | None = None  # host copies when the EMA lives off-device
    event: object | None = None  # CUDA event that says the staging copy has landed
    model: list[torch.Tensor] | None = None  # cached model side when nothing is sharded


@dataclass
class Plan:
    """Model-side tensors for one model object, and the groups that update them."""

    tensors: list[torch.Tensor]
    sharded: bool
    groups: list[Group] = field(default_factory=list)

    def locals(self) -> list[torch.Tensor]:
        """Rank-local model tensors, in EMA order."""
        return [local_view(t) for t in self.tensors] if self.sharded else self.tensors

    def model_side(self, group: Group, local: list[torch.Tensor] | None) -> list[torch.Tensor]:
        if group.model is not None:
            return group.model
        assert local is not None
        return [local[i] for i in group.index]


def build_plan(model: nn.Module, names: list[str], shadow: list[torch.Tensor], include_buffers: bool) -> Plan:
    """Resolve ``names`` on ``model`` and group the (EMA, model) pairs.

    Raises:
        KeyError: when the model lacks tensors the EMA tracks.
    """
    found: dict[str, torch.Tensor] = dict(model.named_parameters())
    if include_buffers:
        found.update(model.named_buffers())
    missing = [n for n in names if n not in found]
    if missing:
        raise KeyError(f"model has no tensors named {missing[:5]} ({len(missing)} missing) tracked by this EMA")
    tensors = [found[n] for n in names]
    sharded = any(shard_spec(t) is not None for t in tensors)
    local = [local_view(t) for t in tensors]

    keyed: dict[tuple, list[int]] = {}
    for i, (s, m) in enumerate(zip(shadow, local, strict=True)):
        average = s.is_floating_point()
        staged = average and s.device != m.device
        key = (average, staged, str(m.device), s.dtype == m.dtype, str(s.device))
        keyed.setdefault(key, []).append(i)

    plan = Plan(tensors=tensors, sharded=sharded)
    for (average, staged, model_device, same_dtype, _), index in keyed.items():
        group = Group(index=index, shadow=[shadow[i] for i in index], same_dtype=same_dtype, average=average)
        if staged:
            # The EMA lives elsewhere (e.g. on CPU to spare accelerator memory): copy the model
            # tensors into host staging buffers without blocking, average once they have landed.
            pin = torch.device(model_device).type == "cuda"
            group.staging = [
                torch.empty(local[i].shape, dtype=local[i].dtype, device=shadow[i].device, pin_memory=pin)
                for i in index
            ]
            group.same_dtype = all(shadow[i].dtype == local[i].dtype for i in index)
        if not sharded:
            group.model = [tensors[i] for i in index]
        plan.groups.append(group)
    return plan


def stage_(group: Group, src: list[torch.Tensor]) -> None:
    """Start the copy of ``src`` into ``group.staging``; :func:`finish_stage_` completes it."""
    assert group.staging is not None
    on_cuda = src[0].device.type == "cuda"
    # A loop, not _foreach_copy_: cross-device copies are transfer-bound, and per-tensor copy_
    # is the path every torch version supports for device-to-pinned-host copies.
    for dst, s in zip(group.staging, src, strict=True):
        dst.copy_(s, non_blocking=on_cuda)
    if on_cuda:
        event = torch.cuda.Event()
        event.record()
        group.event = event


def finish_stage_(group: Group, weight: float) -> None:
    """Wait for the staging copy (normally long done) and fold it into the EMA."""
    assert group.staging is not None
    if group.event is not None:
        group.event.synchronize()  # type: ignore[attr-defined]
        group.event = None
    blend_(group.shadow, group.staging, weight, group.same_dtype)


def copy_pairs_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Exact copies ``dst[i] <- src[i]`` across devices and dtypes."""
    same = [(d, s) for d, s in zip(dst, src, strict=True) if d.device == s.device]
    if len(same) == len(dst):
        torch._foreach_copy_(dst, src)
        return
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)
