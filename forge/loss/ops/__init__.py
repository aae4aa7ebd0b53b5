"""The maths behind :mod:`forge.loss`, apart from any Trainer (as Liger keeps ``ops/``).

``chunked`` is the autograd Function (matmuls in PyTorch, on every device); its per-row work runs
in ``rows`` (PyTorch) or ``triton_rows`` (Triton kernels, CUDA; imported only when chosen).
``functional`` is its ``F.cross_entropy``-shaped face.
"""

from __future__ import annotations

from forge.loss.ops.chunked import (
           CEOptions,
           ChunkedLinearCrossEntropy,
           chunked_linear_cross_entropy,
           default_chunk_size,
)
from forge.loss.ops.functional import fused_linear_cross_entropy

__all__ = ["CEOptions", "ChunkedLinearCrossEntropy", "chunked_linear_cross_entropy", "default_chunk_size",
           "fused_linear_cross_entropy"]
