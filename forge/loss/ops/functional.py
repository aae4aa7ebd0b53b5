"""The fused linear + cross-entropy as a plain function: ``hidden @ W.T`` never materialised.

The maths lives in :mod:`forge.loss.ops.chunked` (an autograd Function); this is its public
face, shaped like ``torch.nn.functional.cross_entropy``.
"""

from __future__ import annotations

import torch

from forge.loss.ops.chunked import CEOptions, chunked_linear_cross_entropy


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` without materialising the logits.

    Equal to ``F.cross_entropy(logits, labels, ignore_index=..., reduction=..., label_smoothing=...)``
    on ``logits = softcap(logit_scale * (hidden @ weight.T + bias))``, plus ``z_loss * logsumexp^2`` per
    valid token, each token's term multiplied by ``token_weights``. ``"mean"`` divides by the number
    of non-ignored tokens (not by the weight sum). Gradients for ``hidden``, ``weight`` and ``bias`` are
    computed chunk by chunk in the forward pass and scaled in the backward; under ``torch.no_grad()``
(or when no input requires a gradient) only the loss is computed. Under autocast the matmuls run
in the autocast dtype, as ``nn.Linear`` would.

    Args:
        hidden: ``[..., hidden_size]`` inputs of the LM head (any leading shape).
        weight: ``[vocab, hidden_size]`` LM head weight (tied embeddings work: pass the shared tensor).
        labels: Target ids with the leading shape of ``hidden``; ``ignore_index`` marks skipped tokens.
        bias: Optional ``[vocab]`` bias.
        token_weights: Optional fixed weights with the leading shape of ``hidden`` (no gradient).
        ignore_index: Label value that contributes nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-token losses with the leading shape).
        label_smoothing: As in ``torch.nn.functional.cross_entropy``.
        z_loss: Coefficient of the ``logsumexp(logits)^2`` regulariser (PaLM uses 1e-4).
        logit_softcap: ``c * tanh(logits / c)`` soft-capping (Gemma 2), None for none.
        logit_scale: Multiplier applied to the logits before soft-capping.
        chunk_size: Tokens per chunk; None picks at most ``hidden_size / 2`` rows and 2**25 logits.
        backend: Per-row kernels: ``"auto"`` (Triton on CUDA when ``triton`` is installed, else
            PyTorch), ``"torch"`` or ``"triton"``.

    Returns:
        The loss: a scalar, or per-token values for ``reduction="none"``.

    Example:
        >>> h = torch.randn(4, 16, 64, requires_grad=True)
        >>> W = torch.randn(1000, 64, requires_grad=True)
        >>> loss = fused_linear_cross_entropy(h, W, torch.randint(0, 1000, (4, 16)))
        >>> loss.backward()
    """
    lead = labels.shape
    opts = CEOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
        backend=backend,
    )
    tw = None if token_weights is None else token_weights.reshape(-1)
    loss = chunked_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), bias, tw, None, opts
    )[0]
    return loss.view(lead) if reduction == "none" else loss
