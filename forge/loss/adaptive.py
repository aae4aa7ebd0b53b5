"""AdaptiveLoss: token-weighted causal-LM loss for ``Trainer(compute_loss_func=...)``.

Private module; the public names live in :mod:`forge.loss`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from forge.loss.figures import RecordedWeights, WeightStats
from forge.loss.ops.chunked import CEOptions, chunked_linear_cross_entropy
from forge.loss.patch import use_fused_lm_head
from forge.loss.strategies import Combined, as_strategies


class AdaptiveLoss:
    """Token-weighted causal-LM loss for ``Trainer(compute_loss_func=...)``.

    ``loss = sum_i w_i * (ce_i + z_loss * lse_i^2) / num_items_in_batch`` over the shifted, non-ignored
    tokens, where ``w_i`` is the product of the strategies' weights (clamped to
    ``[clamp_min, clamp_max]``, then optionally rescaled to mean one over the micro-batch). Dividing
    by the Trainer's ``num_items_in_batch`` (the valid-token count of the whole accumulated batch)
    makes batch 8 x accumulation 1 and batch 2 x accumulation 4 give the same gradient; without it
    the micro-batch's own count is used. With ``normalize`` or ``hard_tokens`` the weights are computed
    per micro-batch, so that equivalence is no longer exact (see ``docs/loss.md``).

    Create it before the Trainer; call :meth:`attach` (or :func:`use_fused_lm_head`) on the model for
    the memory-saving fused path. Stateless: nothing to checkpoint.

    Args:
        strategy: A :class:`TokenWeighting` (``focal(2.0)``, ``dft()``, ...), a strategy name, a
            callable ``(logp, entropy, labels) -> weights``, a list of those (weights multiply), or
            None for plain cross-entropy.
        normalize: Rescale weights to mean one over the micro-batch's valid tokens; None uses the
            strategy's default (True for ``entropy`` and ``hard_tokens``).
        clamp_min: Lower bound on the prediction-dependent weights (on the batch-derived weights
            when no strategy looks at the predictions).
        clamp_max: Upper bound, likewise.
        label_smoothing: As in ``torch.nn.functional.cross_entropy``.
        z_loss: Coefficient of the ``logsumexp^2`` regulariser.
        ignore_index: Label value to skip.
        chunk_size: Tokens per chunk of the fused kernel; None picks automatically.

    Example:
        >>> loss_fn = AdaptiveLoss(strategy=focal(2.0)).attach(model)
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, compute_loss_func=loss_fn)
    """

    def __init__(
        self,
        strategy: Any = None,
        *,
        normalize: bool | None = None,
        clamp_min: float | None = None,
        clamp_max: float | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        ignore_index: int = -100,
        chunk_size: int | None = None,
    ):
        self.strategies = as_strategies(strategy)
        predictive = [s for s in self.strategies if s.predictive]
        self.weight_fn = Combined(predictive) if predictive else None
        if normalize is None:
            normalize = any(s.normalize_default for s in self.strategies)
        self.normalize = normalize
        self.clamp_min, self.clamp_max = clamp_min, clamp_max
        self.label_smoothing, self.z_loss = label_smoothing, z_loss
        self.ignore_index, self.chunk_size = ignore_index, chunk_size
        self.stats = WeightStats()  # the forge/loss/... figures, on the device until a log

    def _recorded(self):
        """The strategies' weight function, recording its weights for the figures (training only)."""
        if self.weight_fn is None or not torch.is_grad_enabled():
            return self.weight_fn
        return RecordedWeights(self.weight_fn, self.stats, self.clamp_min, self.clamp_max)

    def __repr__(self) -> str:
        return (
            f"AdaptiveLoss(strategy={self.strategies}, normalize={self.normalize}, z_loss={self.z_loss}, "
            f"label_smoothing={self.label_smoothing})"
        )

    def attach(self, model: torch.nn.Module) -> AdaptiveLoss:
        """Patch ``model`` with :func:`use_fused_lm_head` using this loss; returns ``self``.

        Example:
            >>> trainer = Trainer(model=model, args=args, compute_loss_func=AdaptiveLoss().attach(model))
        """
        use_fused_lm_head(model, loss=self)
        return self

    def _options(self, reduction: str) -> CEOptions:
        return CEOptions(
            ignore_index=self.ignore_index,
            reduction=reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            chunk_size=self.chunk_size,
            normalize=self.normalize,
            clamp_min=self.clamp_min,
            clamp_max=self.clamp_max,
        )

    def fixed_weights(self, labels: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor | None:
        """Product of the batch-derived weights (prompt masks, example weights), shape of ``labels``."""
        w = None
        for s in self.strategies:
            sw = s.fixed_weights(labels, extras)
            if sw is not None:
                w = sw if w is None else w * sw
        return w

    def __call__(
        self,
        outputs: Any,
        labels: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Loss of a causal LM's ``outputs`` for unshifted ``labels``, the ``compute_loss_func`` contract."""
        if labels is None:
            raise ValueError("AdaptiveLoss needs labels: the Trainer passes them when the batch has a 'labels' key")
        get = outputs.get if isinstance(outputs, dict) else lambda k, d=None: getattr(outputs, k, d)
        extras = get("loss_extras", None) or getattr(outputs, "loss_extras", None) or {}
        fixed = self.fixed_weights(labels, extras)
        # Causal shift: position t predicts token t + 1.
        y = labels[..., 1:].reshape(-1)
        if torch.is_grad_enabled():
            self.stats.add_tokens((y != self.ignore_index).sum(), y.numel())
        tw = None if fixed is None else fixed[..., 1:].reshape(-1)
        head = get("lm_head", None)
        if head is not None:
            hidden = get("last_hidden_state")[..., :-1, :]
            opts = self._options("sum")
            opts = CEOptions(
                **{**opts.__dict__, "logit_softcap": get("logit_softcap"), "logit_scale": get("logit_scale")}
            )
            hidden = hidden.reshape(-1, hidden.shape[-1]).to(head.weight.dtype)
            total = chunked_linear_cross_entropy(
                hidden,
                head.weight,
                y.to(hidden.device),
                head.bias,
                None if tw is None else tw.to(hidden.device),
                self._recorded(),
                opts,
            )[0]
        else:
            logits = get("logits") if isinstance(outputs, dict) or hasattr(outputs, "logits") else outputs[0]
            total = self.loss_from_logits(logits[..., :-1, :], y.to(logits.device), tw, reduction="sum")
        denom = num_items_in_batch
        if denom is None:
            denom = (y != self.ignore_index).sum().clamp(min=1)
        if torch.is_tensor(denom):
            denom = denom.to(total.device)
        return total / denom

    def loss_from_logits(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        token_weights: torch.Tensor | None = None,
        reduction: str = "sum",
    ) -> torch.Tensor:
        """The same weighted loss from materialised logits (already shifted), through plain autograd.

        Example:
            >>> AdaptiveLoss(strategy=dft()).loss_from_logits(torch.randn(6, 10), torch.arange(6))
        """
        z = logits.reshape(-1, logits.shape[-1])
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        y = labels.reshape(-1).to(z.device)
        valid = y != self.ignore_index
        ce = F.cross_entropy(
            z, y, ignore_index=self.ignore_index, reduction="none", label_smoothing=self.label_smoothing
        )
        lse = torch.logsumexp(z, dim=-1)
        base = ce + self.z_loss * lse.square() * valid
        logp = z.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1) - lse
        ent = None
        if self.weight_fn is not None and self.weight_fn.needs_entropy:
            lp = torch.log_softmax(z, dim=-1)
            ent = -(lp.exp() * lp).sum(-1)
        w = torch.ones_like(base) if token_weights is None else token_weights.reshape(-1).to(base)
        if self.weight_fn is not None:
            # Strategies see the valid tokens only, as in the fused kernel.
            fw = self._recorded()(logp[valid], None if ent is None else ent[valid], y[valid])
            fw = torch.as_tensor(fw, dtype=base.dtype, device=base.device).expand(int(valid.sum()))
            if self.clamp_min is not None or self.clamp_max is not None:
                fw = fw.clamp(self.clamp_min, self.clamp_max)
            w = w.masked_scatter(valid, w[valid] * fw)
        elif self.clamp_min is not None or self.clamp_max is not None:
            w = w.clamp(self.clamp_min, self.clamp_max)
        w = torch.where(valid, w, torch.zeros_like(w))
        per_token = w * base
        if self.normalize:
            per_token = per_token * (valid.sum() / w.detach().sum().clamp(min=torch.finfo(w.dtype).tiny))
        if reduction == "none":
            return per_token.view(labels.shape)
        total = per_token.sum()
        return total / valid.sum().clamp(min=1) if reduction == "mean" else total
