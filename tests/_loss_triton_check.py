"""Run forge's Triton loss kernels under the Triton interpreter on CPU and compare them.

Started by ``tests/test_loss_triton.py`` in a subprocess with ``TRITON_INTERPRET=1`` in the
environment (it must be set before ``triton`` is imported). For every case it computes the loss
and the gradients of ``hidden``, ``weight`` and ``bias`` three ways, in float32 on small shapes:
the Triton backend, the PyTorch backend, and ``F.cross_entropy`` on materialised float64 logits
(with the token weights applied by autograd). It prints one JSON line: per case, the largest
differences and whether they are within tolerance, first for the kernels as shipped ("exact"),
then for a few cases with the kernel made to write a gradient 1% too large ("broken", through
``triton_rows.GRAD_SCALE``), which the same comparison must catch.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

import forge.loss.ops.triton_rows as triton_rows
from forge.loss.ops import CEOptions, chunked_linear_cross_entropy
from forge.loss.strategies import custom, focal

LOSS_TOL, GRAD_TOL = 2e-5, 2e-5

CASES = {
    "plain_mean": {},
    "sum_bias_chunks": {"reduction": "sum", "bias": True, "chunk_size": 5},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2, "reduction": "sum"},
    "softcap_scale": {"logit_softcap": 3.0, "logit_scale": 0.7},
    "token_weights": {"token_weights": True, "reduction": "sum"},
    "focal_weight_fn": {"weight_fn": "focal", "reduction": "sum", "clamp_max": 0.9},
    "batch_weight_fn_normalised": {"weight_fn": "batch", "normalize": True},
    "reduction_none_everything": {"reduction": "none", "bias": True, "label_smoothing": 0.05, "z_loss": 1e-3,
                                  "logit_softcap": 4.0, "token_weights": True, "weight_fn": "focal"},
    "metrics": {"need_entropy": True, "need_top1": True, "chunk_size": 4},
}


def _inputs(seed: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    n, h, v = 21, 8, 37  # a vocabulary of 37 spans three blocks of 16, the last one partial
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.7
    b = torch.randn(v, generator=g) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    tw = torch.rand(n, generator=g) + 0.5
    return hidden, weight, b, labels, tw


def _weight_fn(name):
    if name == "focal":
        return focal(1.5)
    if name == "batch":
        return custom(lambda logp, ent, y: torch.softmax(-logp.detach(), 0) * logp.numel(), needs_entropy=False)
    return None


def _reference(hidden, weight, bias, labels, tw, case):
    """F.cross_entropy on float64 logits; weights applied through autograd (focal keeps its gradient)."""
    z = hidden @ weight.t() + (0 if bias is None else bias)
    z = z * case.get("logit_scale", 1.0)
    cap = case.get("logit_softcap")
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    valid = labels != -100
    ce = F.cross_entropy(z, labels, reduction="none", label_smoothing=case.get("label_smoothing", 0.0))
    base = ce + case.get("z_loss", 0.0) * torch.logsumexp(z, -1).square() * valid
    w = torch.ones_like(base) if tw is None else tw.clone()
    fn = _weight_fn(case.get("weight_fn"))
    if fn is not None:
        logp = torch.log_softmax(z, -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
        fw = fn(logp[valid], None, labels[valid])
        if case.get("clamp_max") is not None:
            fw = fw.clamp(max=case["clamp_max"])
        w = w.masked_scatter(valid, w[valid] * fw)
    w = torch.where(valid, w, torch.zeros_like(w))
    per = w * base
    if case.get("normalize"):
        per = per * valid.sum() / w.detach().sum()
    red = case.get("reduction", "mean")
    return per if red == "none" else per.sum() / (valid.sum() if red == "mean" else 1)


def _run_case(name: str, case: dict, backend: str | None) -> tuple[dict, torch.Tensor, list]:
    """(outputs, loss, grads) of one case on one path: a backend, or None for the reference."""
    hidden, weight, bias, labels, tw = _inputs(seed=len(name), bias=case.get("bias", False))
    dtype = torch.float32 if backend else torch.float64
    params = [t.to(dtype).requires_grad_(True) for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    h, w, b = params[0], params[1], params[2] if bias is not None else None
    fixed = tw.to(dtype) if case.get("token_weights") else None
    if backend is None:
        loss, extra = _reference(h, w, b, labels, fixed, case), {}
    else:
        keys = ("reduction", "label_smoothing", "z_loss", "logit_softcap", "logit_scale", "chunk_size", "normalize",
                "clamp_max", "need_entropy", "need_top1")
        opts = CEOptions(backend=backend, chunk_size=case.get("chunk_size", 8),
                         **{k: case[k] for k in keys if k in case and k != "chunk_size"})
        out = chunked_linear_cross_entropy(h, w, labels, b, fixed, _weight_fn(case.get("weight_fn")), opts)
        loss = out[0]
        extra = {"logp": out[2], "entropy": out[3], "top1": out[4].float(), "weights": out[5]}
    grad_out = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)
    grads = torch.autograd.grad(loss, params, grad_out)
    return extra, loss.detach(), [g.detach() for g in grads]


def compare(names) -> dict:
    results = {}
    for name in names:
        case = CASES[name]
        ext_t, loss_t, grads_t = _run_case(name, case, "triton")
        ext_p, loss_p, grads_p = _run_case(name, case, "torch")
        _, loss_r, grads_r = _run_case(name, case, None)
        d = {
            "loss_vs_torch": (loss_t - loss_p).abs().max().item(),
            "loss_vs_cross_entropy": (loss_t.double() - loss_r).abs().max().item(),
            "grad_vs_torch": max((a - b).abs().max().item() for a, b in zip(grads_t, grads_p)),
            "grad_vs_cross_entropy": max((a.double() - b).abs().max().item() for a, b in zip(grads_t, grads_r)),
            "extras_vs_torch": max([(ext_t[k] - ext_p[k]).abs().max().item() for k in ext_t if ext_t[k].numel()]
                                   or [0.0]),
        }
        scale = max(1.0, loss_r.abs().max().item())
        d["loss_ok"] = max(d["loss_vs_torch"], d["loss_vs_cross_entropy"], d["extras_vs_torch"]) <= LOSS_TOL * scale
        d["grad_ok"] = max(d["grad_vs_torch"], d["grad_vs_cross_entropy"]) <= GRAD_TOL * scale
        results[name] = d
    return results


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 before starting this script")
    triton_rows.BLOCK_MAX = 16  # several vocabulary blocks per row, the last one partial
    exact = compare(CASES)
    triton_rows.GRAD_SCALE = 1.01
    broken = compare(["plain_mean", "softcap_scale", "reduction_none_everything"])
    print(json.dumps({"exact": exact, "broken": broken}))


if __name__ == "__main__":
    main()
