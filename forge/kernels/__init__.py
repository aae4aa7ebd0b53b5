"""Device kernels behind :mod:`forge.loss`.

``chunked`` is the pure-PyTorch implementation that runs on every device. A Triton kernel for CUDA
would live beside it behind a lazy import; see ``docs/loss.md`` for its status.
"""

from __future__ import annotations

from forge.kernels.chunked import CEOptions, ChunkedLinearCrossEntropy, chunked_linear_cross_entropy, default_chunk_size

__all__ = ["CEOptions", "ChunkedLinearCrossEntropy", "chunked_linear_cross_entropy", "default_chunk_size"]
