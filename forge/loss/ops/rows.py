"""The per-row work of one chunk in plain PyTorch: statistics, then the logits gradient in place.

:mod:`forge.loss.ops.chunked` computes a chunk's raw logits ``h @ W.T + b`` with one matmul and
hands them to a *rows backend*: this module (any device) or :mod:`forge.loss.ops.triton_rows`
(CUDA, or CPU under ``TRITON_INTERPRET=1``). Both compute, per row, with ``z = softcap(scale * raw)``
and ``lse = logsumexp z``::

    base = (1 - eps) * (lse - z_y) + eps * (lse - mean_j z_j) + z_loss * lse ** 2
    d base-weighted-loss / d raw_j = (p_j * coef_p - eps * w / V + [j = y] * coef_y) * dz/dx * scale

where ``coef_p = w * (1 + 2 z_loss lse) - v`` and ``coef_y = v - (1 - eps) * w`` fold in the token
weight ``w`` and the weighting's vector-Jacobian term ``v`` (see ``chunked``).

This backend upcasts half-precision logits into a float32 buffer and works in place there: ``exp(z -
max)`` overwrites ``z`` (a second buffer keeps ``z`` with soft-capping or entropy), and the softmax
is never normalised, ``1 / sum`` goes into the coefficients.
"""

from __future__ import annotations

from typing import Any

import torch


class TorchRows:
    """The PyTorch rows backend (stateless; the chunk's buffers live in the caller's workspace)."""

    name = "torch"

    @staticmethod
    def buffers(rows: int, vocab: int, raw_dtype: torch.dtype, device: torch.device, keep_logits: bool) -> dict:
        """Chunk buffers beyond the raw logits: a float32 copy for half precision, a second for ``z``."""
        acc = torch.float32 if raw_dtype in (torch.float16, torch.bfloat16) else raw_dtype
        out = {"acc": torch.empty(rows, vocab, dtype=acc, device=device) if acc != raw_dtype else None}
        out["extra"] = torch.empty(rows, vocab, dtype=acc, device=device) if keep_logits else None
        return out

    @staticmethod
    def stats(raw: torch.Tensor, y: torch.Tensor, opts: Any, bufs: dict) -> dict[str, torch.Tensor]:
        """Per-row ``lse``, ``logp``, ``base`` (and ``entropy`` / ``top1``), plus state for :meth:`grad`."""
        r = raw.shape[0]
        z = raw if bufs["acc"] is None else bufs["acc"][:r].copy_(raw)
        if opts.logit_scale != 1.0:
            z.mul_(opts.logit_scale)
        if opts.logit_softcap is not None:
            z.div_(opts.logit_softcap).tanh_().mul_(opts.logit_softcap)
        extra = None if bufs["extra"] is None else bufs["extra"][:r]
        out: dict[str, Any] = {}
        z_y = z.gather(1, y[:, None]).squeeze(1)
        if opts.need_top1:
            out["top1"] = z.argmax(dim=1) == y
        mean_z = z.mean(dim=1) if opts.label_smoothing else None
        m = z.amax(dim=1, keepdim=True)
        e = torch.sub(z, m, out=extra) if extra is not None else z.sub_(m)
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
        out.update(lse=lse, logp=-nll, base=base, _e=e, _inv_sum=s.reciprocal(), _z=z if extra is not None else None)
        return out

    @staticmethod
    def grad(raw: torch.Tensor, y: torch.Tensor, st: dict, coef_p, coef_y, w, opts: Any) -> torch.Tensor:
        """The chunk's logits gradient (float32 or float64), written over the ``exp`` buffer."""
        g = st["_e"].mul_((coef_p * st["_inv_sum"])[:, None])
        g.scatter_add_(1, y[:, None], coef_y[:, None].to(g.dtype))
        if opts.label_smoothing:
            g.sub_((opts.label_smoothing / g.shape[1]) * w[:, None])
        if opts.logit_softcap is not None:
            # z = cap * tanh(x / cap)  =>  dz/dx = 1 - (z / cap)^2
            g.mul_(st["_z"].div_(opts.logit_softcap).square_().neg_().add_(1))
        if opts.logit_scale != 1.0:
            g.mul_(opts.logit_scale)
        return g
