"""On-device gradient and weight statistics for :mod:`forge.monitor`.

Everything here runs in the training hot path, so it launches a fixed handful of fused
``torch._foreach_*`` kernels per optimizer step, never calls ``.item()`` and returns one flat
float32 row per step that the monitor copies to the host once per logging interval.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Block containers used by HF models: model.layers.7, transformer.h.7, encoder.block.7, ...
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.", "module.")
_HEAD_RE = re.compile(r"(?:^|\.)(?:lm_head|score|classifier|head|embed_out)(?:\.|$)")
_EMBED_RE = re.compile(r"embed|(?:^|\.)(?:wte|wpe|word_embeddings|position_embeddings)(?:\.|$)")


def group_parameters(names: list[str]) -> list[str]:
    """Map parameter names to blocks by prefix: ``layer_07``, ``embeddings``, ``head``, ``other``.

    A stand-in for the architecture-aware layer discovery of :mod:`forge.layers`; it only reads
    names, so it works on PEFT-wrapped, compiled and DDP-wrapped models alike.

    Example:
        >>> group_parameters(["model.embed_tokens.weight", "model.layers.7.mlp.up_proj.weight",
        ...                   "model.norm.weight", "lm_head.weight"])
        ['embeddings', 'layer_07', 'other', 'head']
    """
    stripped = []
    for name in names:
        changed = True
        while changed:  # PEFT inside DDP inside torch.compile nests several prefixes
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        stripped.append(name)
    matches = [_LAYER_RE.search(n) for n in stripped]
    width = max([2] + [len(m.group(1)) for m in matches if m])  # zero-pad so names sort
    out = []
    for name, m in zip(stripped, matches):
        if m:
            stack = name[: m.start()]
            # Encoder-decoder and multimodal models number their blocks from 0 in each stack.
            prefix = next((k + "_" for k in ("vision", "encoder", "decoder") if k in stack), "")
            out.append(f"{prefix}layer_{int(m.group(1)):0{width}d}")
        elif _EMBED_RE.search(name):
            out.append("embeddings")
        elif _HEAD_RE.search(name):
            out.append("head")
        else:
            out.append("other")
    return out


def _nonzeros(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    # count_nonzero beats _foreach_norm(ord=0): no fused kernel exists for ord 0 on any device.
    return [torch.count_nonzero(t) for t in tensors]


@dataclass
class ParamPlan:
    """The trainable parameters of a model, their names and groups, fixed at setup time.

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
    group_numel: torch.Tensor = field(repr=False)
    # (device, parameter indices) buckets: foreach kernels want one device per call.
    buckets: list[tuple[torch.device, list[int]]] = field(repr=False)
    # Norms accumulate in float32 (bf16 sums lose digits), float64 for a float64 model.
    norm_dtype: torch.dtype = torch.float32
    _index_cache: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False)
    _cpu_copies: dict[torch.device, list[torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, model: nn.Module) -> ParamPlan:
        """Collect the parameters that require grad, in ``named_parameters`` order."""
        names, params = [], []
        for name, p in model.named_parameters():  # shared (tied) weights are listed once
            if p.requires_grad and p.numel() > 0:
                names.append(name)
                params.append(p)
        if not params:
            raise ValueError("GradientMonitor: the model has no trainable parameters")
        groups = group_parameters(names)
        group_names = list(dict.fromkeys(groups))  # first-appearance order: embeddings..head
        group_of = [group_names.index(g) for g in groups]
        device = params[0].device
        buckets: dict[torch.device, list[int]] = {}
        for i, p in enumerate(params):
            buckets.setdefault(p.device, []).append(i)
        numel = torch.zeros(len(group_names), dtype=torch.float64)
        for g, p in zip(group_of, params):
            numel[g] += p.numel()
        return cls(
            names=names,
            params=params,
            group_of=group_of,
            group_names=group_names,
            device=device,
            group_index=torch.tensor(group_of, device=device),
            group_numel=numel.to(device=device, dtype=torch.float32),
            buckets=list(buckets.items()),
            norm_dtype=torch.float64 if any(p.dtype == torch.float64 for p in params)
            else torch.float32,
        )

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
        grads = [p.grad for p in self.params]
        pnorm = self._per_param(grads, self._norms)
        if inv_scale is not None:
            pnorm = pnorm * inv_scale
        sq = pnorm * pnorm
        group_norm = self._group_sum(sq).sqrt()
        if count_zeros:
            zero_frac = 1.0 - self._group_sum(self._per_param(grads, _nonzeros)) / self.group_numel
        else:
            zero_frac = torch.full_like(group_norm, float("nan"))
        total = sq.sum().sqrt()  # what clip_grad_norm_ computes: norm of the per-tensor norms
        if max_norm is not None and max_norm > 0:
            # torch.nn.utils.clip_grads_with_norm_ scales by min(1, max_norm / (total + 1e-6)).
            post = total * torch.clamp(max_norm / (total + 1e-6), max=1.0)
        else:
            post = total
        bad = ~torch.isfinite(pnorm)
        num_bad = bad.sum().to(torch.float32)
        culprit = (self.num_params - 1) - torch.argmax(bad.flip(0).to(torch.uint8))
        if loss is None:
            loss_v = torch.full((), float("nan"), device=self.device)
        else:
            loss_v = loss.detach().to(device=self.device, dtype=torch.float32).reshape(())
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
            params = [self.params[i].detach() for i in indices]
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
                                [self.params[i].detach() for i in indices])
        d_norm = self._per_param(before, self._norms)
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
