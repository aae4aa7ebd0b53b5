"""On-device gradient and weight statistics for :mod:`forge.monitor`.

Everything here runs in the training hot path, so it launches a fixed handful of fused
``torch._foreach_*`` kernels per optimizer step, never calls ``.item()`` and returns one flat
float32 row per step that the monitor copies to the host once per logging interval.

Under several processes the row is global: gradients are read through
:func:`forge.core.distributed.local_grad` (the FSDP2 shard, the ZeRO fragment or partition),
each rank computes its part of the squared norms and zero counts, and one all-reduce per step
(with the loss, averaged like the Trainer's ``loss``) makes every rank's row the same, so every
rank takes the same decision without another exchange.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from forge.core.distributed import (
    all_reduce_,
    grads_partitioned,
    is_sharded,
    local_grad,
    local_view,
    numel,
    world_size,
)


def _nonzeros(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    # count_nonzero beats _foreach_norm(ord=0): no fused kernel exists for ord 0 on any device.
    return [torch.count_nonzero(t) for t in tensors]


@dataclass
class ParamPlan:
    """The parameters a run trains, their names and groups (from the model's
    :class:`~forge.core.trainable.TrainableSet`), and which of them train right now.

    Every parameter that trains at some point is in the plan, so a block that a schedule
    unfreezes later is watched from that step on; :meth:`set_active` tells the plan which are
    trainable now (frozen ones report nothing instead of an all-zero gradient).

    Example:
        >>> plan = ParamPlan.build(torch.nn.Linear(2, 2))
        >>> plan.names, plan.group_names
        (['weight', 'bias'], ['other'])
    """

    names: list[str]
    params: list[torch.Tensor]
    group_of: list[int]
    group_names: list[str]
    device: torch.device
    group_index: torch.Tensor = field(repr=False)
    # (device, parameter indices) buckets: foreach kernels want one device per call.
    buckets: list[tuple[torch.device, list[int]]] = field(repr=False)
    # Norms accumulate in float32 (bf16 sums lose digits), float64 for a float64 model.
    norm_dtype: torch.dtype = torch.float32
    active: list[bool] = field(default_factory=list, repr=False)
    trainable: Any = field(default=None, repr=False)  # the TrainableSet the plan follows
    _group_active_numel: torch.Tensor | None = field(default=None, repr=False)
    # Several processes: gradients split between ranks (FSDP2, ZeRO) need their parts summed;
    # weights only under FSDP2 / ZeRO-3. world is 1 in a single process.
    world: int = 1
    grads_split: bool = False
    weights_split: bool = False
    _index_cache: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False)
    _cpu_copies: dict[torch.device, list[torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, model: nn.Module) -> ParamPlan:
        """Every parameter of the model's trainable universe, in ``named_parameters`` order."""
        from forge.core.trainable import trainable_set

        ts = trainable_set(model)
        names = [n for n, p in zip(ts.universe, ts.parameters()) if numel(p) > 0]
        params = ts.parameters(names)
        if not params:
            raise ValueError("GradientMonitor: the model has no trainable parameters")
        groups = [ts.group_of(n) for n in names]
        group_names = list(dict.fromkeys(groups))  # first-appearance order: embeddings..head
        group_of = [group_names.index(g) for g in groups]
        device = local_view(params[0]).device
        buckets: dict[torch.device, list[int]] = {}
        for i, p in enumerate(params):
            buckets.setdefault(local_view(p).device, []).append(i)
        plan = cls(
            names=names,
            params=params,
            group_of=group_of,
            group_names=group_names,
            device=device,
            group_index=torch.tensor(group_of, device=device),
            buckets=list(buckets.items()),
            norm_dtype=torch.float64 if any(p.dtype == torch.float64 for p in params)
            else torch.float32,
            trainable=ts,
            world=world_size(),
            grads_split=grads_partitioned(params),
            weights_split=any(is_sharded(p) for p in params),
        )
        plan.set_active([p.requires_grad for p in params])
        return plan

    def set_active(self, active: list[bool]) -> None:
        """Which parameters train now (a schedule changed them); costs one small copy."""
        self.active = list(active)
        count = torch.zeros(self.num_groups, dtype=torch.float64)
        for g, p, on in zip(self.group_of, self.params, self.active, strict=True):
            if on:
                count[g] += numel(p)
        self._group_active_numel = count.to(device=self.device, dtype=torch.float32)

    @property
    def num_params(self) -> int:
        return len(self.params)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def row_layout(self) -> dict[str, slice]:
        """Where each quantity sits in the row returned by :meth:`grad_row`."""
        g, p = self.num_groups, self.num_params
        return {
            "scalars": slice(0, 5),  # loss, pre-clip norm, post-clip norm, #non-finite, culprit
            "group_grad_norm": slice(5, 5 + g),
            "group_zero_frac": slice(5 + g, 5 + 2 * g),
            "param_grad_norm": slice(5 + 2 * g, 5 + 2 * g + p),
        }

    def update_layout(self) -> dict[str, slice]:
        """Where each quantity sits in the row returned by :meth:`update_row`."""
        g = self.num_groups
        return {
            "group_weight_norm": slice(0, g),
            "group_update_ratio": slice(g, 2 * g),
            "scalars": slice(2 * g, 2 * g + 2),  # global weight norm, global update ratio
        }

    def _per_param(self, tensors: list[torch.Tensor | None], reduce: Any) -> torch.Tensor:
        """``[P]`` float32 vector of ``reduce`` per tensor; a missing tensor (grad None) gives 0."""
        out: torch.Tensor | None = None
        for dev, indices in self.buckets:
            present = [i for i in indices if tensors[i] is not None]
            if not present:
                continue
            values = reduce([tensors[i] for i in present])
            vec = torch.stack(values).to(self.device, torch.float32, non_blocking=True)
            if len(present) == self.num_params:
                return vec
            if out is None:
                out = torch.zeros(self.num_params, device=self.device)
            key = tuple(present)
            idx = self._index_cache.get(key)
            if idx is None:
                idx = self._index_cache[key] = torch.tensor(present, device=self.device)
            out[idx] = vec
        return out if out is not None else torch.zeros(self.num_params, device=self.device)

    def _norms(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(torch._foreach_norm(tensors, 2.0, dtype=self.norm_dtype))

    def _group_sum(self, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.num_groups, device=self.device).index_add_(
            0, self.group_index, values
        )

    @torch.no_grad()
    def grad_row(
        self,
        loss: torch.Tensor | None,
        max_norm: float | None,
        inv_scale: torch.Tensor | None = None,
        count_zeros: bool = True,
    ) -> torch.Tensor:
        """Statistics of the current ``.grad`` of every trainable parameter, as one device row.

        Args:
            loss: this step's loss (a device scalar) or None when unknown (stored as NaN).
            max_norm: the clipping threshold that will be applied after this call, or None.
            inv_scale: ``1 / loss_scale`` under fp16 GradScaler, to report unscaled norms.
            count_zeros: also count exactly-zero entries (a second pass over the gradients,
                so the monitor asks for it on logging steps only; NaN otherwise).

        Returns:
            A float32 row laid out as :meth:`row_layout` says. The culprit is the non-finite
            parameter nearest the output: backward reaches it first, so that is where a NaN
            or inf produced in the backward pass shows up before it spreads to earlier layers.
        """
        grads = [local_grad(p) for p in self.params]
        pnorm = self._per_param(grads, self._norms)
        if inv_scale is not None:
            pnorm = pnorm * inv_scale
        sq = pnorm * pnorm
        nonzero = self._per_param(grads, _nonzeros) if count_zeros else None
        if loss is None:
            loss_v = torch.full((), float("nan"), device=self.device)
        else:
            loss_v = loss.detach().to(device=self.device, dtype=torch.float32).reshape(())
        if self.world > 1:
            # The one collective of the step: this rank's parts of the squared norms and zero
            # counts (when gradients are split) and its loss; every rank gets the same sums.
            parts = [sq, nonzero] if self.grads_split and nonzero is not None else [sq] if self.grads_split else []
            flat = all_reduce_(torch.cat([*parts, loss_v.reshape(1)]))
            loss_v = flat[-1] / self.world  # the mean over ranks, as the Trainer logs `loss`
            if self.grads_split:
                sq = flat[: self.num_params]
                pnorm = sq.sqrt()
                if nonzero is not None:
                    nonzero = flat[self.num_params: 2 * self.num_params]
        # A group with nothing trainable right now (frozen by a schedule) reports NaN, which
        # the metrics leave out, instead of a zero norm that would read as a dead block.
        live = self._group_active_numel
        nan = torch.full_like(live, float("nan"))
        group_norm = torch.where(live > 0, self._group_sum(sq).sqrt(), nan)
        if nonzero is not None:
            zeros = 1.0 - self._group_sum(nonzero) / live
            zero_frac = torch.where(live > 0, zeros, nan)
        else:
            zero_frac = nan
        total = sq.sum().sqrt()  # what clip_grad_norm_ computes: norm of the per-tensor norms
        if max_norm is not None and max_norm > 0:
            # torch.nn.utils.clip_grads_with_norm_ scales by min(1, max_norm / (total + 1e-6)).
            post = total * torch.clamp(max_norm / (total + 1e-6), max=1.0)
        else:
            post = total
        bad = ~torch.isfinite(pnorm)
        num_bad = bad.sum().to(torch.float32)
        culprit = (self.num_params - 1) - torch.argmax(bad.flip(0).to(torch.uint8))
        scalars = torch.stack([loss_v, total, post, num_bad, culprit.to(torch.float32)])
        return torch.cat([scalars, group_norm, zero_frac, pnorm])

    @torch.no_grad()
    def snapshot(self) -> list[torch.Tensor]:
        """A copy of the trainable weights, taken just before the optimizer step.

        On an accelerator the copy is transient (the caching allocator makes it cheap and
        lends the memory to activations in between); in CPU memory it is kept and refilled,
        because fresh pages cost a page fault each, more than the copy itself.
        """
        out: list[torch.Tensor] = [None] * self.num_params  # type: ignore[list-item]
        for dev, indices in self.buckets:
            params = [local_view(self.params[i]).detach() for i in indices]
            if dev.type == "cpu":
                kept = self._cpu_copies.get(dev)
                if kept is None:
                    kept = self._cpu_copies[dev] = [torch.empty_like(p) for p in params]
                torch._foreach_copy_(kept, params)
                copies = kept
            else:
                copies = torch._foreach_mul(params, 1.0)
            for i, c in zip(indices, copies):
                out[i] = c
        return out

    @torch.no_grad()
    def update_row(self, before: list[torch.Tensor]) -> torch.Tensor:
        """Weight norms and update-to-weight ratios ``||W_after - W_before|| / ||W_before||``.

        ``before`` (from :meth:`snapshot`) is overwritten in place to save memory.
        """
        w_norm = self._per_param(before, self._norms)
        for _, indices in self.buckets:
            torch._foreach_sub_([before[i] for i in indices],
                                [local_view(self.params[i]).detach() for i in indices])
        d_norm = self._per_param(before, self._norms)
        if self.world > 1 and self.weights_split:  # each rank holds a part of each weight
            sums = all_reduce_(torch.cat([w_norm * w_norm, d_norm * d_norm]))
            w_norm, d_norm = sums[: self.num_params].sqrt(), sums[self.num_params:].sqrt()
        group_w = self._group_sum(w_norm * w_norm).sqrt()
        group_d = self._group_sum(d_norm * d_norm).sqrt()
        nan = torch.full_like(group_w, float("nan"))
        ratio = torch.where(group_w > 0, group_d / group_w, nan)
        total_w = (w_norm * w_norm).sum().sqrt()
        total_ratio = (d_norm * d_norm).sum().sqrt() / total_w
        return torch.cat([group_w, ratio, torch.stack([total_w, total_ratio])])


def flops_per_token(model: nn.Module) -> tuple[float, float]:
    """Training FLOPs per token, aware of which weights are trainable.

    Each matmul weight of shape ``in x out`` costs ``2 in out`` FLOPs per token forward, the same
    again backward for the activation gradient, and ``2 in out`` more for its weight gradient only
    when the weight is trainable: ``6 N`` for a full fine-tune, about ``4 N`` for LoRA. Attention
    adds ``12 L d T`` per token at sequence length ``T`` (the PaLM appendix B count).

    Returns:
        ``(dense, attention_per_position)``: FLOPs per token are ``dense + attention * T``.

    Example:
        >>> flops_per_token(torch.nn.Linear(4, 8))
        (192.0, 0.0)
    """
    dense = 0
    for module in model.modules():
        if next(module.children(), None) is not None or isinstance(module, nn.Embedding):
            continue  # leaves only, so PEFT wrappers and their base layers are not counted twice
        weight = getattr(module, "weight", None)
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            size = int(module.in_features) * int(module.out_features)  # right for 4-bit too
        elif isinstance(weight, torch.Tensor) and weight.dim() == 2:
            size = weight.numel()  # e.g. GPT-2's Conv1D
        else:
            continue
        trainable = isinstance(weight, torch.Tensor) and weight.requires_grad
        dense += 2 * size * (3 if trainable else 2)
    config = getattr(model, "config", None)
    attention = 0.0
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if layers and heads:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        attention = 12.0 * layers * heads * head_dim
    return float(dense), attention


def count_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
    """``(tokens, sequence length)`` of a forward call, read from ``input_ids`` without a sync."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if not isinstance(ids, torch.Tensor) or ids.dim() == 0:
        return 0, 0
    return ids.numel(), ids.shape[-1]


def memory_gib(device: torch.device) -> tuple[float, float] | None:
    """``(allocated, peak allocated)`` in GiB on an accelerator; None on CPU."""
    if device.type == "cpu" or not hasattr(torch, "accelerator"):
        return None
    try:
        gib = float(2**30)
        return (torch.accelerator.memory_allocated(device) / gib,
                torch.accelerator.max_memory_allocated(device) / gib)
    except (RuntimeError, ValueError, TypeError):  # backends without allocator statistics
        return None


# Dense bf16 peak of a few common accelerators, used only when peak_flops is not set.
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def default_peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known CUDA GPU, else None (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16.items() if k in name), None)
