"""Pure-PyTorch chunked linear + cross-entropy with the gradients computed in the forward pass.

The ``tokens x vocab`` logits are never materialised. Ignored tokens are dropped first (prompt and
padding tokens cost nothing), then the remaining tokens are walked in chunks of ``chunk_size`` rows;
each chunk's logits, ``exp(z - max)``, per-token loss and logits gradient are built in place in one
preallocated float32 ``chunk x vocab`` buffer (two with soft-capping or entropy), and folded into
``grad_hidden`` / ``grad_weight`` / ``grad_bias`` before the next chunk overwrites it. With
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

Private plumbing for :func:`forge.loss.fused_linear_cross_entropy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

# Cap on one chunk's float32 logits: 2**25 elements (128 MiB).
_CHUNK_ELEMENTS = 2**25
_LOW_PRECISION = (torch.float16, torch.bfloat16)


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
    # Per-token statistics returned beside the loss (for metrics): each costs a pass per chunk.
    need_entropy: bool = False
    need_top1: bool = False


def default_chunk_size(num_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Rows per chunk: a power of two, at most ``hidden_size / 2`` and 2**25 logits.

    ``hidden_size / 2`` rows of float32 logits take as much memory as the LM head weight in half
    precision, so the workspace stays small next to memory the caller already holds, while the
    matmuls keep hundreds of rows (full speed on CPU and GPU).
    """
    rows = max(16, min(hidden_size // 2, _CHUNK_ELEMENTS // max(vocab_size, 1)))
    return max(1, min(num_tokens, 2 ** int(math.log2(rows))))


class _Workspace:
    """The chunk buffers of one pass, allocated once and reused by every chunk."""

    def __init__(self, rows: int, weight: torch.Tensor, two: bool):
        acc = torch.float32 if weight.dtype in _LOW_PRECISION else weight.dtype
        vocab = weight.shape[0]
        self.logits = torch.empty(rows, vocab, dtype=acc, device=weight.device)
        self.extra = torch.empty(rows, vocab, dtype=acc, device=weight.device) if two else None
        # Half-precision matmuls write a half buffer that is then upcast into ``logits``.
        self.half = torch.empty(rows, vocab, dtype=weight.dtype, device=weight.device) if acc != weight.dtype else None


def _logits_chunk(h, weight, bias, opts: CEOptions, ws: _Workspace) -> torch.Tensor:
    """``softcap(scale * (h @ weight.T + bias))`` in float32 (or float64), in the workspace."""
    r = h.shape[0]
    out = ws.half[:r] if ws.half is not None else ws.logits[:r]
    if bias is not None:
        torch.addmm(bias, h, weight.t(), out=out)
    else:
        torch.mm(h, weight.t(), out=out)
    z = ws.logits[:r]
    if ws.half is not None:
        z.copy_(out)
    if opts.logit_scale != 1.0:
        z.mul_(opts.logit_scale)
    if opts.logit_softcap is not None:
        z.div_(opts.logit_softcap).tanh_().mul_(opts.logit_softcap)
    return z


def _chunk_stats(z: torch.Tensor, y: torch.Tensor, opts: CEOptions, e_out: torch.Tensor | None) -> dict[str, Any]:
    """Per-token lse, logp, base loss (and entropy / top-1) of one chunk, and ``e = exp(z - max)``.

    ``e`` is written over ``z`` unless ``e_out`` is given (soft-capping needs ``z`` again for its
    derivative, the entropy needs ``sum p * z``). It stays unnormalised: ``1 / sum`` is folded into
    the gradient coefficients, which saves a full pass over the chunk.
    """
    out: dict[str, Any] = {}
    z_y = z.gather(1, y[:, None]).squeeze(1)
    if opts.need_top1:
        out["top1"] = z.argmax(dim=1) == y
    mean_z = z.mean(dim=1) if opts.label_smoothing else None
    m = z.amax(dim=1, keepdim=True)
    e = torch.sub(z, m, out=e_out) if e_out is not None else z.sub_(m)
    e.exp_()
    s = e.sum(dim=1)
    lse = m.squeeze(1) + s.log()
    if opts.need_entropy:
        # H = lse - sum_j p_j z_j, as a batched dot product: no further chunk-sized buffer.
        out["entropy"] = lse - torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1) / s
    nll = lse - z_y
    eps = opts.label_smoothing
    base = nll if not eps else (1 - eps) * nll + eps * (lse - mean_z)
    if opts.z_loss:
        base = base + opts.z_loss * lse.square()
    out.update(e=e, inv_sum=s.reciprocal(), lse=lse, logp=-nll, base=base)
    return out


def _weights_and_vjp(weight_fn, fixed, logp, entropy, labels, cotangent, opts: CEOptions):
    """Token weights ``w`` and ``v = J_w(logp)^T (cotangent * fixed)`` (None when ``w`` has no gradient).

    ``cotangent`` is the per-token factor the weight multiplies (``base`` times the output
    gradient), so ``v`` is exactly the extra term the weighting adds to the logits gradient.
    """
    w = torch.ones_like(logp) if fixed is None else fixed.to(logp.dtype)
    v = None
    clamp = opts.clamp_min is not None or opts.clamp_max is not None
    if weight_fn is not None:
        with torch.enable_grad():
            u = logp.detach().requires_grad_(True)
            fw = weight_fn(u, None if entropy is None else entropy.detach(), labels)
            fw = torch.as_tensor(fw, dtype=logp.dtype, device=logp.device).expand_as(logp)
            if clamp:
                fw = fw.clamp(opts.clamp_min, opts.clamp_max)
            if fw.requires_grad:
                (v,) = torch.autograd.grad(fw, u, grad_outputs=cotangent * w, allow_unused=True)
        w = w * fw.detach()
    elif clamp:
        w = w.clamp(opts.clamp_min, opts.clamp_max)
    return w, v


def _grad_chunk(st: dict[str, Any], z, y, w, v, opts: CEOptions) -> torch.Tensor:
    """d(sum_i loss_i)/d(pre-scale logits) of one chunk, written over ``e`` (``p = e / sum``).

    d loss_i / d z_j = p_j (w (1 + 2 zl lse) - v) + [j = y] (v - (1 - eps) w) - eps w / V
    """
    eps, zl = opts.label_smoothing, opts.z_loss
    coef_p = w * (1 + 2 * zl * st["lse"]) if zl else w
    coef_y = -(1 - eps) * w
    if v is not None:
        coef_p, coef_y = coef_p - v, coef_y + v
    g = st["e"].mul_((coef_p * st["inv_sum"])[:, None])
    g.scatter_add_(1, y[:, None], coef_y[:, None].to(g.dtype))
    if eps:
        g.sub_((eps / g.shape[1]) * w[:, None])
    if opts.logit_softcap is not None:
        # z = cap * tanh(x / cap)  =>  dz/dx = 1 - (z / cap)^2
        g.mul_(z.div_(opts.logit_softcap).square_().neg_().add_(1))
    if opts.logit_scale != 1.0:
        g.mul_(opts.logit_scale)
    return g


class _Grads:
    """Gradient buffers of one call; float32 accumulation for half-precision parameters.

    ``grad_hidden`` has the full token count: rows of ignored tokens stay zero and the valid rows
    are written at their positions, so no compacted copy is ever scattered back.
    """

    def __init__(self, hidden, weight, bias, needs: tuple[bool, ...], idx: torch.Tensor | None):
        acc = torch.float32 if weight.dtype in _LOW_PRECISION else weight.dtype
        self.idx = idx
        self.hidden = None
        if needs[0]:
            self.hidden = torch.empty_like(hidden) if idx is None else torch.zeros_like(hidden)
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        self.bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if bias is not None and needs[2] else None

    def add(self, g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rows: slice) -> None:
        if self.hidden is not None:
            if self.idx is None:
                torch.mm(g.to(weight.dtype), weight, out=self.hidden[rows])
            else:
                self.hidden.index_copy_(0, self.idx[rows], g.to(weight.dtype) @ weight)
        if self.weight is not None:
            self.weight.addmm_(g.t(), h.to(g.dtype))
        if self.bias is not None:
            self.bias.add_(g.sum(dim=0))


def _run(hidden, weight, bias, labels, idx, opts, *, grads=None, w_all=None, v_all=None, weight_fn=None, fixed=None):
    """Walk the valid tokens in chunks; returns their per-token stats, and fills ``grads`` if given.

    ``labels`` (and ``fixed``, ``w_all``, ``v_all``) hold the valid tokens only; ``idx`` gives their
    rows in ``hidden`` (None when every token is valid). Without ``grads`` this is a statistics pass
    (one matmul per chunk). With ``grads`` the weights are ``w_all`` / ``v_all`` when given, else
    computed per chunk from ``weight_fn`` and ``fixed``.
    """
    n = labels.shape[0]
    if n == 0:  # every label ignored
        empty = hidden.new_zeros(0, dtype=torch.float32 if weight.dtype in _LOW_PRECISION else weight.dtype)
        return {
            "logp": empty,
            "lse": empty,
            "base": empty,
            "w": empty,
            "entropy": empty,
            "top1": torch.zeros(0, dtype=torch.bool, device=hidden.device),
        }
    chunk = min(opts.chunk_size or default_chunk_size(n, weight.shape[0], weight.shape[1]), n)
    keep = opts.need_entropy or (grads is not None and opts.logit_softcap is not None)
    ws = _Workspace(chunk, weight, two=keep)
    acc: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        # Gathering each chunk's rows avoids a compacted copy of the whole hidden input.
        h = hidden[rows] if idx is None else hidden.index_select(0, idx[rows])
        y = labels[rows]
        z = _logits_chunk(h, weight, bias, opts, ws)
        st = _chunk_stats(z, y, opts, ws.extra[: h.shape[0]] if keep else None)
        if grads is not None:
            if w_all is None:
                w, v = _weights_and_vjp(
                    weight_fn,
                    None if fixed is None else fixed[rows],
                    st["logp"],
                    st.get("entropy"),
                    y,
                    st["base"],
                    opts,
                )
            else:
                w, v = w_all[rows], None if v_all is None else v_all[rows]
            grads.add(_grad_chunk(st, z if keep else None, y, w, v, opts), h, weight, rows)
            st["w"] = w
        del st["e"], st["inv_sum"]
        for k, t in st.items():
            acc.setdefault(k, []).append(t)
    return {k: torch.cat(t) for k, t in acc.items()}


def _scatter(x: torch.Tensor, idx: torch.Tensor | None, n: int) -> torch.Tensor:
    """Per-token values of the valid tokens back at their positions (zeros elsewhere)."""
    if idx is None:
        return x
    return x.new_zeros((n, *x.shape[1:])).index_copy_(0, idx, x)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """autograd.Function behind :func:`forge.loss.fused_linear_cross_entropy`.

    Returns ``(loss, logp, entropy, top1, weights)``, per-token values zero at ignored tokens; only
    ``loss`` is differentiable. ``entropy`` and ``top1`` are empty unless requested in the options.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weights, weight_fn, opts: CEOptions):
        n = labels.shape[0]
        valid = labels != opts.ignore_index
        idx = valid.nonzero().squeeze(1)
        # Drop ignored tokens once (a host sync for the count): they cost no matmul afterwards.
        if idx.numel() == n:
            idx = None
        else:
            labels = labels.index_select(0, idx)
            token_weights = None if token_weights is None else token_weights.index_select(0, idx)
        n_valid = labels.shape[0]
        full_batch = weight_fn is not None and not getattr(weight_fn, "elementwise", True)
        run = replace(opts, need_entropy=opts.need_entropy or bool(getattr(weight_fn, "needs_entropy", False)))
        needs = ctx.needs_input_grad[:3]

        st, w, v = None, None, None
        if opts.reduction == "none" or full_batch:
            # Weights that look at the whole batch (top fraction, user callables) need every token's
            # statistics first: one extra logits matmul per chunk, still chunk-sized memory.
            st = _run(hidden, weight, bias, labels, idx, run)
            w, v = _weights_and_vjp(weight_fn, token_weights, st["logp"], st.get("entropy"), labels, st["base"], run)
        if opts.reduction != "none":
            grads = _Grads(hidden, weight, bias, needs, idx)
            if full_batch:
                st.update(_run(hidden, weight, bias, labels, idx, run, grads=grads, w_all=w, v_all=v))
            else:
                st = _run(hidden, weight, bias, labels, idx, run, grads=grads, weight_fn=weight_fn, fixed=token_weights)
            w = st["w"]
        # Normalising to mean weight one is a constant factor, so it is applied after the passes.
        scale = torch.ones((), dtype=st["base"].dtype, device=st["base"].device)
        if opts.normalize and n_valid:
            scale = n_valid / w.sum().clamp(min=torch.finfo(w.dtype).tiny)
        out_w = w * scale
        per_token = w * st["base"]
        if opts.reduction == "none":
            loss = _scatter(per_token * scale, idx, n)
            ctx.save_for_backward(
                hidden, weight, bias, labels, idx, st["logp"], st["base"], w, scale, st.get("entropy"), token_weights
            )
            ctx.weight_fn, ctx.opts, ctx.n = weight_fn, run, n
        else:
            if opts.reduction == "mean":
                scale = scale / max(n_valid, 1)
            loss = per_token.sum() * scale
            ctx.grads = (grads.hidden, grads.weight, grads.bias)
            ctx.save_for_backward(scale, idx)
            ctx.dtypes, ctx.n = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype), n
        ctx.reduction = opts.reduction
        empty = loss.new_empty(0)
        extras = (
            _scatter(st["logp"], idx, n),
            _scatter(st["entropy"], idx, n) if opts.need_entropy else empty,
            _scatter(st["top1"], idx, n) if opts.need_top1 else empty,
            _scatter(out_w, idx, n),
        )
        ctx.mark_non_differentiable(*extras)
        return (loss, *extras)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.reduction != "none":
            if ctx.grads is None:
                raise RuntimeError("fused_linear_cross_entropy: backward through the same call twice is not supported")
            scale, idx = ctx.saved_tensors
            factor = grad_loss * scale
            # In place: a scaled copy of grad_weight would add a vocab x hidden buffer to the peak.
            gh, gw, gb = (None if g is None else g.mul_(factor).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes))
            ctx.grads = None
            return gh, gw, gb, None, None, None, None
        hidden, weight, bias, labels, idx, logp, base, w, scale, entropy, fixed = ctx.saved_tensors
        go = grad_loss if idx is None else grad_loss.index_select(0, idx)
        go = go * scale
        # Exact vector-Jacobian product of the weighting for the actual per-token output gradients.
        # The weights were recorded (for the trackers) when the forward computed them.
        weight_fn = getattr(ctx.weight_fn, "unrecorded", ctx.weight_fn)
        _, v = _weights_and_vjp(weight_fn, fixed, logp, entropy, labels, base * go, ctx.opts)
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3], idx)
        _run(hidden, weight, bias, labels, idx, ctx.opts, grads=grads, w_all=w * go, v_all=v)
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

    Example:
        >>> h, W = torch.randn(10, 8), torch.randn(32, 8)
        >>> loss, logp, *_ = chunked_linear_cross_entropy(h, W, torch.randint(0, 32, (10,)))
    """
    opts = opts or CEOptions()
    if opts.reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {opts.reduction!r}")
    if opts.chunk_size is not None and opts.chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {opts.chunk_size}")
    if opts.logit_softcap is not None and not (opts.logit_softcap > 0 and math.isfinite(opts.logit_softcap)):
        raise ValueError(f"logit_softcap must be a positive number, got {opts.logit_softcap}")
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, token_weights, weight_fn, opts)
