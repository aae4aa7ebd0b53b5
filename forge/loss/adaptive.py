"""AdaptiveLoss: the token-weighted causal-LM loss that the patched model forward computes.

Private module; the public names live in :mod:`forge.loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from forge.loss.figures import RecordedWeights, WeightStats
from forge.loss.ops.chunked import CEOptions, chunked_linear_cross_entropy
from forge.loss.patch import use_fused_lm_head
from forge.loss.strategies import Combined, as_strategies


@dataclass
class TokenLosses:
    """Per-token results of one loss call, shaped like the shifted labels ``[..., seq - 1]``.

    Attributes:
        total: The differentiable sum of the weighted per-token terms.
        token_loss: Each token's term (detached; zero where the label is ignored or masked).
        logp: Log-probability of each label (detached, zero where ignored).
        entropy: Entropy of each prediction in nats, or None unless metrics were asked for.
        top1: Whether the label is the most likely token, or None likewise.
        mask: The tokens that count.
    """

    total: torch.Tensor
    token_loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor | None
    top1: torch.Tensor | None
    mask: torch.Tensor


class AdaptiveLoss:
    """Token-weighted causal-LM loss, computed by the model's own forward once :meth:`attach` ran.

    ``loss = sum_i w_i * (ce_i + z_loss * lse_i^2) / num_items_in_batch`` over the shifted, non-ignored
    tokens, where ``w_i`` is the product of the strategies' weights (clamped to
    ``[clamp_min, clamp_max]``, then optionally rescaled to mean one over the micro-batch). Dividing
    by the Trainer's ``num_items_in_batch`` (the valid-token count of the whole accumulated batch)
    makes batch 8 x accumulation 1 and batch 2 x accumulation 4 give the same gradient; without it
    the micro-batch's own count is used. With ``normalize`` or ``hard_tokens`` the weights are computed
    per micro-batch, so that equivalence is no longer exact (see ``docs/loss.md``).

    Create it before the Trainer and :meth:`attach` it to the model: the patched forward then
    returns this loss whenever it gets ``labels`` (the Trainer's own ``compute_loss`` route, one
    decoder forward per micro-batch), with the fused LM head while training. Give the trainer
    :meth:`callback` too: it keeps the forward in charge under TRL's ``SFTTrainer`` and logs the
    ``forge/loss/...`` figures. It also works as a plain ``loss_fn(outputs, labels)`` on logits.
    Stateless apart from its figures: nothing to checkpoint.

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
        backend: Per-row kernels of the fused path: ``"auto"`` (Triton on CUDA when installed),
            ``"torch"`` or ``"triton"``.

    Example:
        >>> loss_fn = AdaptiveLoss(strategy=focal(2.0)).attach(model)
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[loss_fn.callback()])
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
        backend: str = "auto",
    ):
        self.strategies = as_strategies(strategy)
        predictive = [s for s in self.strategies if s.predictive]
        self.weight_fn = Combined(predictive) if predictive else None
        if normalize is None:
            normalize = any(s.normalize_default for s in self.strategies)
        self.normalize = normalize
        self.clamp_min, self.clamp_max = clamp_min, clamp_max
        self.label_smoothing, self.z_loss = label_smoothing, z_loss
        self.ignore_index, self.chunk_size, self.backend = ignore_index, chunk_size, backend
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
            >>> loss_fn = AdaptiveLoss(focal(2.0)).attach(model)
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
            backend=self.backend,
        )

    def callback(self) -> Any:
        """A :class:`~forge.loss.LossCallback` for this loss: the trainer's callbacks need it.

        Example:
            >>> trainer = SFTTrainer(model=model, args=args, train_dataset=ds, callbacks=[loss_fn.callback()])
        """
        from forge.loss.callback import LossCallback

        return LossCallback(self)

    def fixed_weights(self, labels: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor | None:
        """Product of the batch-derived weights (per-example weights), shape of ``labels``."""
        w = None
        for s in self.strategies:
            sw = s.fixed_weights(labels, extras)
            if sw is not None:
                w = sw if w is None else w * sw
        return w

    def masked_labels(self, labels: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        """``labels`` with the tokens the strategies mask out (prompt masking) set to ``ignore_index``."""
        for s in self.strategies:
            keep = s.label_mask(labels, extras)
            if keep is not None:
                labels = torch.where(keep, labels, torch.full_like(labels, self.ignore_index))
        return labels

    def token_losses(self, outputs: Any, labels: torch.Tensor, *, metrics: bool = False) -> TokenLosses:
        """Per-token terms of the loss of a causal LM's ``outputs`` for unshifted ``labels``.

        ``outputs`` holds either ``logits`` or, from :func:`use_fused_lm_head`, ``last_hidden_state``
        and the ``lm_head`` to apply chunk by chunk. With ``metrics`` the per-token entropy and
        top-1 correctness come back too (TRL logs them), from the same pass.
        """
        if labels is None:
            raise ValueError("AdaptiveLoss needs labels: the Trainer passes them when the batch has a 'labels' key")
        get = outputs.get if isinstance(outputs, dict) else lambda k, d=None: getattr(outputs, k, d)
        extras = get("loss_extras", None) or getattr(outputs, "loss_extras", None) or {}
        labels = self.masked_labels(labels, extras)
        fixed = self.fixed_weights(labels, extras)
        # Causal shift: position t predicts token t + 1.
        shape = labels[..., 1:].shape
        y = labels[..., 1:].reshape(-1)
        valid = y != self.ignore_index
        if torch.is_grad_enabled():
            self.stats.add_tokens(valid.sum(), y.numel())
        tw = None if fixed is None else fixed[..., 1:].reshape(-1)
        head = get("lm_head", None)
        if head is not None:
            hidden = get("last_hidden_state")[..., :-1, :]
            opts = replace(
                self._options("sum"),
                logit_softcap=get("logit_softcap"),
                logit_scale=get("logit_scale"),
                need_entropy=metrics,
                need_top1=metrics,
            )
            total, token_loss, logp, ent, top1, _ = chunked_linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]),
                head.weight,
                y.to(hidden.device),
                head.bias,
                None if tw is None else tw.to(hidden.device),
                self._recorded(),
                opts,
            )
        else:
            logits = get("logits") if isinstance(outputs, dict) or hasattr(outputs, "logits") else outputs[0]
            per_token, logp, ent, top1 = self._from_logits(logits[..., :-1, :], y, tw, metrics)
            total, token_loss = per_token.sum(), per_token.detach()
        view = (lambda t: t.view(shape)) if metrics else (lambda t: None)
        return TokenLosses(total, token_loss.view(shape), logp.view(shape), view(ent), view(top1), valid.view(shape))

    def reduce(self, terms: TokenLosses, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """The loss: the sum of the terms over ``num_items_in_batch`` (else the counted tokens)."""
        if num_items_in_batch is not None and any(getattr(s, "response_template", None) for s in self.strategies):
            raise ValueError(
                "response_only(response_template=...) masks labels inside the loss, but the Trainer counted "
                "num_items_in_batch from the unmasked labels; mask them in the collator instead: "
                "ResponseOnlyCollator(collator, response_template) (from_preset does this)"
            )
        denom = num_items_in_batch
        if denom is None:
            denom = terms.mask.sum().clamp(min=1)
        if torch.is_tensor(denom):
            denom = denom.to(terms.total.device)
        return terms.total / denom

    def __call__(
        self,
        outputs: Any,
        labels: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Loss of a causal LM's ``outputs`` for unshifted ``labels`` (the ``compute_loss_func`` contract).

        Example:
            >>> loss = AdaptiveLoss(dft())(model(input_ids=ids), labels=ids)
        """
        return self.reduce(self.token_losses(outputs, labels), num_items_in_batch)

    def _from_logits(self, logits, y, token_weights, metrics):
        """(per-token terms, logp, entropy, top1) from materialised, shifted logits, by plain autograd."""
        z = logits.reshape(-1, logits.shape[-1])
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        y = y.to(z.device)
        valid = y != self.ignore_index
        ce = F.cross_entropy(
            z, y, ignore_index=self.ignore_index, reduction="none", label_smoothing=self.label_smoothing
        )
        lse = torch.logsumexp(z, dim=-1)
        base = ce + self.z_loss * lse.square() * valid
        logp = z.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1) - lse
        ent = None
        if metrics or (self.weight_fn is not None and self.weight_fn.needs_entropy):
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
        zero = torch.zeros_like(logp)
        with torch.no_grad():
            top1 = (z.argmax(dim=-1) == y) & valid if metrics else None
            ent = torch.where(valid, ent, zero).detach() if metrics else None
        return per_token, torch.where(valid, logp, zero).detach(), ent, top1

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
        y = labels.reshape(-1)
        per_token = self._from_logits(logits, y, token_weights, False)[0]
        if reduction == "none":
            return per_token.view(labels.shape)
        total = per_token.sum()
        return total / (y != self.ignore_index).sum().clamp(min=1) if reduction == "mean" else total
