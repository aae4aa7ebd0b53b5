"""Chunked linear + cross-entropy with the gradients computed in the forward pass.

The ``tokens x vocab`` logits are never materialised. Ignored tokens are dropped first (prompt and
padding tokens cost nothing), then the remaining tokens are walked in chunks of ``chunk_size`` rows.
For each chunk: one matmul writes its raw logits into a preallocated buffer; a *rows backend*
(:mod:`~forge.loss.ops.rows` in PyTorch, or :mod:`~forge.loss.ops.triton_rows` on CUDA) turns them
into per-token statistics and then, in place, into the logits gradient; two more matmuls fold that
into ``grad_hidden`` and ``grad_weight`` before the next chunk overwrites the buffer. With
``reduction="sum"`` or ``"mean"`` the backward only multiplies by the incoming scalar gradient.
``reduction="none"`` cannot know the per-token output gradients in advance, so it keeps per-token
statistics and recomputes the chunk logits once in the backward.

Per valid token ``i`` (label ``y``, logits ``z`` after scale and soft-capping, ``lse = logsumexp z``)::

    base_i = (1 - eps) * (lse - z_y) + eps * (lse - mean_j z_j) + z_loss * lse ** 2
    loss_i = w_i * base_i

where ``w_i`` is the product of the fixed ``token_weights`` and of ``weight_fn(logp_y, entropy,
labels)``. ``weight_fn`` may keep a gradient with respect to ``logp_y`` (focal loss does): it enters
the logits gradient as a vector-Jacobian product, so any differentiable weighting of the label
log-probability is exact, not only detached ones.

Two rules about the mode a call runs in. Gradient work happens only when ``torch.is_grad_enabled()``
and an input requires a gradient (evaluation under ``no_grad`` is one statistics pass, no buffers).
The matmuls run in the autocast dtype when autocast is on for the weight's device (as ``nn.Linear``
would), else in the weight's dtype; that is read once per call and every dtype inside is explicit.
Loss, softmax and ``grad_weight`` accumulate in float32 (float64 stays float64).

Private plumbing for :func:`forge.loss.fused_linear_cross_entropy`.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from forge.loss.ops.rows import TorchRows

# Cap on one chunk's float32 logits: 2**25 elements (128 MiB).
_CHUNK_ELEMENTS = 2**25
_LOW_PRECISION = (torch.float16, torch.bfloat16)
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class CEOptions:
    """Options of one call, kept together so the autograd.Function signature stays small."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    logit_softcap: float | None = None
    logit_scale: float = 1.0
    chunk_size: int | None = None
    normalize: bool = False
    clamp_min: float | None = None
    clamp_max: float | None = None
    # Per-token statistics returned beside the loss (for metrics): each costs a little per chunk.
    need_entropy: bool = False
    need_top1: bool = False
    backend: str = "auto"  # "auto": Triton on CUDA when installed, else PyTorch; or "torch" / "triton"
    compute_dtype: torch.dtype | None = None  # the matmuls' dtype; None: read from autocast at the call


def default_chunk_size(num_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Rows per chunk: a power of two, at most ``hidden_size / 2`` and 2**25 logits.

    ``hidden_size / 2`` rows of float32 logits take as much memory as the LM head weight in half
    precision, so the workspace stays small next to memory the caller already holds, while the
    matmuls keep hundreds of rows (full speed on CPU and GPU).
    """
    rows = max(16, min(hidden_size // 2, _CHUNK_ELEMENTS // max(vocab_size, 1)))
    return max(1, min(num_tokens, 2 ** int(math.log2(rows))))


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's for a float32 weight under autocast, else the weight's."""
    device = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def rows_backend(name: str, device: torch.device) -> Any:
    """The rows backend for ``name``: ``auto`` takes Triton on CUDA when it is installed."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchRows
    if importlib.util.find_spec("triton") is None:
        if name == "triton":
            raise ImportError("the Triton loss kernel needs triton: pip install 'transformers-forge[triton]'")
        return TorchRows
    from forge.loss.ops.triton_rows import TritonRows

    return TritonRows


class _Workspace:
    """The chunk buffers of one pass, allocated once and reused by every chunk."""

    def __init__(self, rows: int, w_c: torch.Tensor, backend: Any, keep_logits: bool):
        vocab = w_c.shape[0]
        self.raw = torch.empty(rows, vocab, dtype=w_c.dtype, device=w_c.device)
        self.bufs = backend.buffers(rows, vocab, w_c.dtype, w_c.device, keep_logits)

    def logits(self, h_c: torch.Tensor, w_c: torch.Tensor, b_c: torch.Tensor | None) -> torch.Tensor:
        # `out=` reuses one buffer for every chunk; the dtypes are explicit (autocast is off in here).
        out = self.raw[: h_c.shape[0]]
        if b_c is not None:
            return torch.addmm(b_c, h_c, w_c.t(), out=out)
        return torch.mm(h_c, w_c.t(), out=out)


class _Grads:
    """Gradient buffers of one call; float32 accumulation of ``grad_weight`` for half precision.

    ``grad_hidden`` has the full token count: rows of ignored tokens stay zero and the valid rows
    are written at their positions, so no compacted copy is ever scattered back.
    """

    def __init__(self, hidden, weight, bias, needs, idx, cdt: torch.dtype):
        acc = torch.float32 if weight.dtype in _LOW_PRECISION else weight.dtype
        self.idx = idx
        self.hidden = None
        if needs[0]:
            self.hidden = torch.empty_like(hidden) if idx is None else torch.zeros_like(hidden)
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        # Half-precision matmuls cannot accumulate into float32 in place: one product buffer, reused.
        self.product = None
        if self.weight is not None and cdt != acc:
            self.product = torch.empty(weight.shape, dtype=cdt, device=weight.device)
        self.bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if bias is not None and needs[2] else None

    def add(self, g: torch.Tensor, g_c: torch.Tensor, h_c: torch.Tensor, w_c: torch.Tensor, rows: slice) -> None:
        """Fold one chunk's logits gradient ``g`` (``g_c``: the same in the matmul dtype) in."""
        if self.bias is not None:
            self.bias.add_(g.sum(dim=0, dtype=self.bias.dtype))
        if self.hidden is not None:
            if self.idx is None and self.hidden.dtype == g_c.dtype:
                torch.mm(g_c, w_c, out=self.hidden[rows])
            elif self.idx is None:
                self.hidden[rows].copy_(g_c @ w_c)
            else:
                self.hidden.index_copy_(0, self.idx[rows], (g_c @ w_c).to(self.hidden.dtype))
        if self.weight is not None:
            if self.product is None:
                self.weight.addmm_(g_c.t(), h_c)
            else:
                self.weight.add_(torch.mm(g_c.t(), h_c, out=self.product))


def _weights_and_vjp(weight_fn, fixed, logp, entropy, labels, cotangent, opts: CEOptions, need_vjp: bool = True):
    """Token weights ``w`` and ``v = J_w(logp)^T (cotangent * fixed)`` (None when ``w`` has no gradient).

    ``cotangent`` is the per-token factor the weight multiplies (``base`` times the output
    gradient), so ``v`` is exactly the extra term the weighting adds to the logits gradient.
    """
    w = torch.ones_like(logp) if fixed is None else fixed.to(logp.dtype)
    v = None
    clamp = opts.clamp_min is not None or opts.clamp_max is not None
    if weight_fn is not None:
        with torch.enable_grad() if need_vjp else torch.no_grad():
            u = logp.detach().requires_grad_(need_vjp)
            fw = weight_fn(u, None if entropy is None else entropy.detach(), labels)
            fw = torch.as_tensor(fw, dtype=logp.dtype, device=logp.device).expand_as(logp)
            if clamp:
                fw = fw.clamp(opts.clamp_min, opts.clamp_max)
            if need_vjp and fw.requires_grad:
                (v,) = torch.autograd.grad(fw, u, grad_outputs=cotangent * w, allow_unused=True)
        w = w * fw.detach()
    elif clamp:
        w = w.clamp(opts.clamp_min, opts.clamp_max)
    return w, v


def _coefficients(st: dict, w: torch.Tensor, v: torch.Tensor | None, opts: CEOptions):
    """``coef_p``, ``coef_y`` of d loss_i / d z_j = p_j coef_p + [j = y] coef_y - eps w / V."""
    coef_p = w * (1 + 2 * opts.z_loss * st["lse"]) if opts.z_loss else w
    coef_y = -(1 - opts.label_smoothing) * w
    if v is not None:
        coef_p, coef_y = coef_p - v, coef_y + v
    return coef_p, coef_y


def _run(hidden, w_c, b_c, labels, idx, opts, backend, *, grads=None, w_all=None, v_all=None, weight_fn=None,
         fixed=None):
    """Walk the valid tokens in chunks; returns their per-token stats, and fills ``grads`` if given.

    ``labels`` (and ``fixed``, ``w_all``, ``v_all``) hold the valid tokens only; ``idx`` gives their
    rows in ``hidden`` (None when every token is valid). Without ``grads`` this is a statistics pass
    (one matmul per chunk). With ``grads`` the weights are ``w_all`` / ``v_all`` when given, else
    computed per chunk from ``weight_fn`` and ``fixed``.
    """
    n = labels.shape[0]
    acc_dtype = torch.float32 if w_c.dtype in _LOW_PRECISION else w_c.dtype
    if n == 0:  # every label ignored
        empty = hidden.new_zeros(0, dtype=acc_dtype)
        top1 = torch.zeros(0, dtype=torch.bool, device=hidden.device)
        return {"logp": empty, "lse": empty, "base": empty, "w": empty, "entropy": empty, "top1": top1}
    chunk = min(opts.chunk_size or default_chunk_size(n, w_c.shape[0], w_c.shape[1]), n)
    keep = opts.need_entropy or (grads is not None and opts.logit_softcap is not None)
    ws = _Workspace(chunk, w_c, backend, keep_logits=keep)
    acc: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        # Gathering each chunk's rows avoids a compacted copy of the whole hidden input.
        h = hidden[rows] if idx is None else hidden.index_select(0, idx[rows])
        h_c = h.to(w_c.dtype)
        y = labels[rows]
        raw = ws.logits(h_c, w_c, b_c)
        st = backend.stats(raw, y, opts, ws.bufs)
        if grads is not None:
            if w_all is None:
                part = None if fixed is None else fixed[rows]
                w, v = _weights_and_vjp(weight_fn, part, st["logp"], st.get("entropy"), y, st["base"], opts)
            else:
                w, v = w_all[rows], None if v_all is None else v_all[rows]
            coef_p, coef_y = _coefficients(st, w, v, opts)
            g = backend.grad(raw, y, st, coef_p, coef_y, w, opts)
            g_c = g if g.dtype == w_c.dtype else raw.copy_(g)  # the raw logits are no longer needed
            grads.add(g, g_c, h_c, w_c, rows)
            st["w"] = w
        for k, t in st.items():
            if not k.startswith("_"):
                acc.setdefault(k, []).append(t)
    return {k: torch.cat(t) for k, t in acc.items()}


def _scatter(x: torch.Tensor, idx: torch.Tensor | None, n: int) -> torch.Tensor:
    """Per-token values of the valid tokens back at their positions (zeros elsewhere)."""
    if idx is None:
        return x
    return x.new_zeros((n, *x.shape[1:])).index_copy_(0, idx, x)


def _cast(weight, bias, cdt):
    return weight.to(cdt), None if bias is None else bias.to(cdt)


def _forward(hidden, weight, bias, labels, token_weights, weight_fn, opts: CEOptions, needs) -> tuple[tuple, dict]:
    """The whole forward: its six outputs, and what a backward needs (``grads`` for sum/mean)."""
    n = labels.shape[0]
    idx = (labels != opts.ignore_index).nonzero().squeeze(1)
    # Drop ignored tokens once (a host sync for the count): they cost no matmul afterwards.
    if idx.numel() == n:
        idx = None
    else:
        labels = labels.index_select(0, idx)
        token_weights = None if token_weights is None else token_weights.index_select(0, idx)
    n_valid = labels.shape[0]
    full_batch = weight_fn is not None and not getattr(weight_fn, "elementwise", True)
    run = replace(opts, need_entropy=opts.need_entropy or bool(getattr(weight_fn, "needs_entropy", False)))
    backend = rows_backend(opts.backend, weight.device)
    w_c, b_c = _cast(weight, bias, opts.compute_dtype)
    grads = None
    if any(needs) and opts.reduction != "none":
        grads = _Grads(hidden, weight, bias, needs, idx, opts.compute_dtype)
    with torch.autocast(weight.device.type, enabled=False):
        if grads is None or full_batch:
            # Statistics first: for per-token outputs, for weights that look at the whole batch (top
            # fraction, user callables), and as the whole job when no gradient is wanted.
            st = _run(hidden, w_c, b_c, labels, idx, run, backend)
            w, v = _weights_and_vjp(weight_fn, token_weights, st["logp"], st.get("entropy"), labels, st["base"], run,
                                    need_vjp=grads is not None)
            if grads is not None:
                st.update(_run(hidden, w_c, b_c, labels, idx, run, backend, grads=grads, w_all=w, v_all=v))
        else:
            st = _run(hidden, w_c, b_c, labels, idx, run, backend, grads=grads, weight_fn=weight_fn,
                      fixed=token_weights)
            w = st["w"]
    del w_c, b_c
    # Normalising to mean weight one is a constant factor, so it is applied after the passes.
    norm = torch.ones((), dtype=st["base"].dtype, device=st["base"].device)
    if opts.normalize and n_valid:
        norm = n_valid / w.sum().clamp(min=torch.finfo(w.dtype).tiny)
    per_token = w * st["base"]
    token_loss = _scatter(per_token * norm, idx, n)
    scale = norm / max(n_valid, 1) if opts.reduction == "mean" else norm
    loss = token_loss if opts.reduction == "none" else per_token.sum() * scale
    empty = loss.new_empty(0)
    outputs = (
        loss,
        token_loss.clone() if opts.reduction == "none" else token_loss,
        _scatter(st["logp"], idx, n),
        _scatter(st["entropy"], idx, n) if opts.need_entropy else empty,
        _scatter(st["top1"], idx, n) if opts.need_top1 else empty,
        _scatter(w * norm, idx, n),
    )
    state = {"grads": grads, "idx": idx, "labels": labels, "scale": scale, "st": st, "w": w,
             "token_weights": token_weights, "run": run}
    return outputs, state


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """autograd.Function behind :func:`forge.loss.fused_linear_cross_entropy`.

    Returns ``(loss, token_loss, logp, entropy, top1, weights)``: per-token values are zero at
    ignored tokens (``token_loss`` holds each token's weighted term, before a ``"mean"`` division);
    only ``loss`` is differentiable. ``entropy`` and ``top1`` are empty unless requested.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weights, weight_fn, opts: CEOptions):
        needs = ctx.needs_input_grad[:3]
        outputs, state = _forward(hidden, weight, bias, labels, token_weights, weight_fn, opts, needs)
        ctx.reduction, ctx.n = opts.reduction, labels.shape[0]
        if opts.reduction == "none":
            st = state["st"]
            ctx.save_for_backward(hidden, weight, bias, state["labels"], state["idx"], st["logp"], st["base"],
                                  state["w"], state["scale"], st.get("entropy"), state["token_weights"])
            ctx.weight_fn, ctx.opts = weight_fn, state["run"]
        else:
            g = state["grads"]
            ctx.grads = None if g is None else (g.hidden, g.weight, g.bias)
            ctx.save_for_backward(state["scale"])
            ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.reduction != "none":
            if ctx.grads is None:
                raise RuntimeError("fused_linear_cross_entropy: backward through the same call twice is not supported")
            (scale,) = ctx.saved_tensors
            factor = grad_loss * scale
            # In place: a scaled copy of grad_weight would add a vocab x hidden buffer to the peak.
            gh, gw, gb = (None if g is None else g.mul_(factor).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes))
            ctx.grads = None
            return gh, gw, gb, None, None, None, None
        hidden, weight, bias, labels, idx, logp, base, w, scale, entropy, fixed = ctx.saved_tensors
        opts = ctx.opts
        go = grad_loss if idx is None else grad_loss.index_select(0, idx)
        go = go.to(base.dtype) * scale
        # Exact vector-Jacobian product of the weighting for the actual per-token output gradients.
        # The weights were recorded (for the trackers) when the forward computed them.
        weight_fn = getattr(ctx.weight_fn, "unrecorded", ctx.weight_fn)
        _, v = _weights_and_vjp(weight_fn, fixed, logp, entropy, labels, base * go, opts)
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3], idx, opts.compute_dtype)
        w_c, b_c = _cast(weight, bias, opts.compute_dtype)
        with torch.autocast(weight.device.type, enabled=False):
            _run(hidden, w_c, b_c, labels, idx, opts, rows_backend(opts.backend, weight.device), grads=grads,
                 w_all=w * go, v_all=v)
        return (
            grads.hidden,
            None if grads.weight is None else grads.weight.to(weight.dtype),
            None if grads.bias is None else grads.bias.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    weight_fn: Callable | None = None,
    opts: CEOptions | None = None,
) -> tuple[torch.Tensor, ...]:
    """Apply :class:`ChunkedLinearCrossEntropy` to 2-D ``hidden`` and 1-D ``labels``.

    Without gradient mode, or when no input requires a gradient, it runs the statistics pass alone
    (no gradient buffers, no autograd node).

    Example:
        >>> h, W = torch.randn(10, 8), torch.randn(32, 8)
        >>> loss, token_loss, logp, *_ = chunked_linear_cross_entropy(h, W, torch.randint(0, 32, (10,)))
    """
    opts = opts or CEOptions()
    if opts.reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {opts.reduction!r}")
    if opts.chunk_size is not None and opts.chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {opts.chunk_size}")
    if opts.logit_softcap is not None and not (opts.logit_softcap > 0 and math.isfinite(opts.logit_softcap)):
        raise ValueError(f"logit_softcap must be a positive number, got {opts.logit_softcap}")
    if opts.compute_dtype is None:
        opts = replace(opts, compute_dtype=compute_dtype(weight))
    wants_grad = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if torch.is_grad_enabled() and wants_grad:
        return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, token_weights, weight_fn, opts)
    with torch.no_grad():
        return _forward(hidden, weight, bias, labels, token_weights, weight_fn, opts, (False, False, False))[0]
