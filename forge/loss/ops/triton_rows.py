"""The per-row work of one chunk as two Triton kernels: one read for the statistics, one read and
one in-place write for the logits gradient.

The same maths as :mod:`forge.loss.ops.rows` (see its docstring), without its float32 upcast
buffers: the kernels read the raw logits in the matmul's dtype (bfloat16 on a GPU), apply scale and
soft-capping on the fly, accumulate in float32 registers, and write the gradient back over the
logits in that dtype, ready for the next two matmuls (as Liger Kernel does). The statistics kernel
is an online softmax over blocks of the vocabulary (running max, sum of ``exp``, and for the entropy
the sum of ``exp * z``), so each row is read once.

Imported only when the Triton backend is chosen (CUDA with ``triton`` installed, or explicitly).
Tests run these kernels on CPU tensors under ``TRITON_INTERPRET=1`` (set before ``triton`` is
imported), in float32, against the PyTorch backend and ``F.cross_entropy``.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

# Largest vocabulary block one program holds at a time; tests lower it to cover several blocks.
BLOCK_MAX = 8192
# Multiplies the gradient the kernel writes. Always 1.0: a test sets another value to check that
# the interpreter comparison catches a wrong gradient.
GRAD_SCALE = 1.0


@triton.jit
def _transform(x, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    x = x * scale
    if HAS_SOFTCAP:
        # tanh(u) = 1 - 2 / (exp(2u) + 1): finite at both ends, and no libdevice call.
        x = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x / softcap) + 1.0))
    return x


@triton.jit
def _stats_kernel(
    z_ptr, stride, y_ptr, lse_ptr, zy_ptr, mean_ptr, ent_ptr, top1_ptr,
    V, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, NEED_MEAN: tl.constexpr, NEED_ENT: tl.constexpr, NEED_TOP1: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    y = tl.load(y_ptr + row)
    m = -float("inf")
    s = 0.0
    t = 0.0
    zsum = 0.0
    best = 0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        xs = tl.where(mask, _transform(tl.load(base + offs, mask=mask, other=0.0).to(tl.float32), scale, softcap,
                                       HAS_SOFTCAP), 0.0)
        x = tl.where(mask, xs, -float("inf"))
        block_max = tl.max(x, 0)
        if NEED_TOP1:
            # Strictly greater: on ties the earlier block keeps the first index, as torch.argmax does.
            best = tl.where(block_max > m, start + tl.argmax(x, 0), best)
        new_m = tl.maximum(m, block_max)
        alpha = tl.exp(m - new_m)
        e = tl.exp(x - new_m)
        s = s * alpha + tl.sum(e, 0)
        if NEED_ENT:
            t = t * alpha + tl.sum(e * xs, 0)  # e is 0 where masked
        if NEED_MEAN:
            zsum += tl.sum(xs, 0)
        m = new_m
    lse = m + tl.log(s)
    z_y = _transform(tl.load(base + y).to(tl.float32), scale, softcap, HAS_SOFTCAP)
    tl.store(lse_ptr + row, lse)
    tl.store(zy_ptr + row, z_y)
    if NEED_MEAN:
        tl.store(mean_ptr + row, zsum / V)
    if NEED_ENT:
        tl.store(ent_ptr + row, lse - t / s)
    if NEED_TOP1:
        tl.store(top1_ptr + row, (best == y).to(tl.int8))


@triton.jit
def _grad_kernel(
    z_ptr, stride, y_ptr, lse_ptr, cp_ptr, cy_ptr, cu_ptr,
    V, scale, softcap, grad_scale,
    HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    y = tl.load(y_ptr + row)
    lse = tl.load(lse_ptr + row)
    coef_p = tl.load(cp_ptr + row)
    coef_y = tl.load(cy_ptr + row)
    coef_u = tl.load(cu_ptr + row)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        z = _transform(tl.load(base + offs, mask=mask, other=0.0).to(tl.float32), scale, softcap, HAS_SOFTCAP)
        g = tl.exp(z - lse) * coef_p - coef_u + tl.where(offs == y, coef_y, 0.0)
        if HAS_SOFTCAP:
            g = g * (1.0 - (z / softcap) * (z / softcap))
        g = g * (scale * grad_scale)
        tl.store(base + offs, g.to(z_ptr.dtype.element_ty), mask=mask)


def _launch_args(raw: torch.Tensor, opts: Any) -> tuple[dict, int]:
    vocab = raw.shape[1]
    block = min(BLOCK_MAX, triton.next_power_of_2(vocab))
    softcap = opts.logit_softcap
    kw = {"HAS_SOFTCAP": softcap is not None, "BLOCK": block}
    if raw.is_cuda:
        kw["num_warps"] = 8 if block >= 2048 else 4
    return kw, vocab


class TritonRows:
    """The Triton rows backend: :meth:`stats` reads each row once, :meth:`grad` overwrites it."""

    name = "triton"

    @staticmethod
    def buffers(rows: int, vocab: int, raw_dtype: torch.dtype, device: torch.device, keep_logits: bool) -> dict:
        """No buffers beyond the raw logits: the kernels upcast in registers."""
        return {}

    @staticmethod
    def stats(raw: torch.Tensor, y: torch.Tensor, opts: Any, bufs: dict) -> dict[str, torch.Tensor]:
        """Per-row ``lse``, ``logp``, ``base`` (and ``entropy`` / ``top1``) in float32."""
        r = raw.shape[0]
        kw, vocab = _launch_args(raw, opts)
        f32 = {"dtype": torch.float32, "device": raw.device}
        lse, z_y = torch.empty(r, **f32), torch.empty(r, **f32)
        eps = opts.label_smoothing
        mean = torch.empty(r, **f32) if eps else lse
        ent = torch.empty(r, **f32) if opts.need_entropy else lse
        top1 = torch.empty(r, dtype=torch.int8, device=raw.device) if opts.need_top1 else lse
        softcap = 1.0 if opts.logit_softcap is None else float(opts.logit_softcap)
        _stats_kernel[(r,)](
            raw, raw.stride(0), y, lse, z_y, mean, ent, top1, vocab, float(opts.logit_scale), softcap,
            NEED_MEAN=bool(eps), NEED_ENT=bool(opts.need_entropy), NEED_TOP1=bool(opts.need_top1), **kw,
        )
        nll = lse - z_y
        base = nll if not eps else (1 - eps) * nll + eps * (lse - mean)
        if opts.z_loss:
            base = base + opts.z_loss * lse.square()
        out = {"lse": lse, "logp": -nll, "base": base}
        if opts.need_entropy:
            out["entropy"] = ent
        if opts.need_top1:
            out["top1"] = top1.bool()
        return out

    @staticmethod
    def grad(raw: torch.Tensor, y: torch.Tensor, st: dict, coef_p, coef_y, w, opts: Any) -> torch.Tensor:
        """The chunk's logits gradient, written over ``raw`` in its dtype."""
        kw, vocab = _launch_args(raw, opts)
        f32 = torch.float32
        coef_u = (opts.label_smoothing / vocab) * w if opts.label_smoothing else torch.zeros_like(w)
        softcap = 1.0 if opts.logit_softcap is None else float(opts.logit_softcap)
        _grad_kernel[(raw.shape[0],)](
            raw, raw.stride(0), y, st["lse"], coef_p.to(f32).contiguous(), coef_y.to(f32).contiguous(),
            coef_u.to(f32).contiguous(), vocab, float(opts.logit_scale), softcap, float(GRAD_SCALE), **kw,
        )
        return raw
