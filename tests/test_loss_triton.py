"""forge's Triton loss kernels (forge.loss.ops.triton_rows), checked without a GPU.

Triton's interpreter (``TRITON_INTERPRET=1``, set before ``triton`` is imported) runs the kernels
on CPU tensors with numpy, so ``tests/_loss_triton_check.py`` runs in a subprocess with that
variable set: float32, small shapes, every option (bias, ignore_index, label smoothing, z-loss,
soft-capping with a logit scale, fixed token weights, a differentiable and a whole-batch weight
function, all three reductions, the metrics), compared with the PyTorch backend and with
``F.cross_entropy`` on float64 logits: loss and the gradients of hidden, weight and bias.

The same subprocess then makes the kernel write a gradient 1% too large and runs the comparison
again: it must fail there (``test_the_comparison_catches_a_wrong_gradient``). Skipped cleanly
when triton is not installed (``pip install 'transformers-forge[triton]'``). The CUDA tests run
the compiled kernels against the PyTorch backend on a GPU and are skipped without one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
SCRIPT = Path(__file__).with_name("_loss_triton_check.py")


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parents[1]))
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
def test_triton_kernels_match_pytorch_and_cross_entropy(interpreted):
    bad = {name: d for name, d in interpreted["exact"].items() if not (d["loss_ok"] and d["grad_ok"])}
    assert not bad, bad
    assert len(interpreted["exact"]) == 10


@needs_triton
def test_the_comparison_catches_a_wrong_gradient(interpreted):
    broken = interpreted["broken"]
    assert broken and all(d["loss_ok"] and not d["grad_ok"] for d in broken.values()), broken


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_backend_matches_pytorch_backend(dtype):
    from forge.loss.ops import CEOptions, chunked_linear_cross_entropy
    from forge.loss.ops.chunked import rows_backend
    from forge.loss.strategies import focal

    assert rows_backend("auto", torch.device("cuda")).name == "triton"
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1000, 256, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(32003, 256, device="cuda", generator=g) * 0.05).to(dtype)
    labels = torch.randint(0, 32003, (1000,), device="cuda", generator=g)
    labels[::7] = -100
    results = {}
    for backend in ("torch", "triton"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        opts = CEOptions(backend=backend, reduction="sum", label_smoothing=0.1, z_loss=1e-4, logit_softcap=30.0,
                         need_entropy=True, need_top1=True)
        out = chunked_linear_cross_entropy(h, w, labels, None, None, focal(1.0), opts)
        out[0].backward()
        results[backend] = (out[0].float(), out[3], h.grad.float(), w.grad.float())
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, **tol)
