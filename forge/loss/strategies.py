"""Token-weighting strategies for :class:`forge.loss.AdaptiveLoss` (re-exported from ``forge.loss``).

A strategy contributes to the weight ``w_i`` of each predicted token ``i`` in
``loss = sum_i w_i * ce_i / num_items_in_batch``, in one of two ways:

* from the model's own predictions, through ``__call__(logp, entropy, labels) -> weights`` with
  ``logp`` the log-probability of each label (1-D, one entry per token). The weights may keep a
  gradient with respect to ``logp`` (focal loss does); the fused kernel applies it exactly.
* from the batch alone, through ``fixed_weights(labels, extras) -> weights`` (``labels`` of shape
  ``[batch, seq]`` before the causal shift, ``extras`` the batch keys the patched forward kept):
  per-example weights.

Prompt masking is not a weight: :func:`response_only` returns a ``label_mask``, and masked tokens
leave the loss as ``-100`` labels would (numerator and denominator).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


class TokenWeighting:
    """A per-token weighting; subclasses override one or both of the two hooks.

    Attributes:
        elementwise: Whether token ``i``'s weight depends only on token ``i``. Non-elementwise
            strategies are evaluated on the whole micro-batch, which costs one extra logits
            matmul per chunk in the fused kernel.
        needs_entropy: Whether ``__call__`` reads the ``entropy`` argument.
        normalize_default: Whether :class:`~forge.loss.AdaptiveLoss` rescales the weights to mean
            one when its own ``normalize`` is left at ``None``.

    Example:
        >>> class Squared(TokenWeighting):
        ...     def __call__(self, logp, entropy, labels):
        ...         return logp.exp().detach() ** 2
    """

    elementwise: bool = True
    needs_entropy: bool = False
    normalize_default: bool = False

    def __call__(self, logp: torch.Tensor, entropy: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor | None:
        """Weights from predictions; ``None`` leaves them at one."""
        return None

    def fixed_weights(self, labels: torch.Tensor, extras: Mapping[str, Any]) -> torch.Tensor | None:
        """Weights from the batch, shape ``labels.shape``; ``None`` leaves them at one."""
        return None

    def label_mask(self, labels: torch.Tensor, extras: Mapping[str, Any]) -> torch.Tensor | None:
        """Which labels count at all (bool, shape ``labels.shape``); ``None`` keeps them all.

        Masked labels leave the loss entirely, numerator and denominator, as ``-100`` labels do.
        """
        return None

    @property
    def predictive(self) -> bool:
        """Whether this strategy looks at the model's predictions (overrides ``__call__``)."""
        return type(self).__call__ is not TokenWeighting.__call__

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Focal(TokenWeighting):
    """Focal loss ``-(1 - p)^gamma log p``; see :func:`focal`."""

    def __init__(self, gamma: float = 2.0, detach: bool = False):
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.detach = detach

    def __call__(self, logp, entropy, labels):
        # -expm1(logp) = 1 - p without cancellation when p is close to one; the clamp keeps the
        # derivative of pow finite for gamma < 1 at p == 1.
        one_minus_p = (-torch.expm1(logp)).clamp(min=torch.finfo(logp.dtype).tiny)
        w = one_minus_p.pow(self.gamma)
        return w.detach() if self.detach else w


class DFT(TokenWeighting):
    """Dynamic Fine-Tuning: weight by the detached label probability; see :func:`dft`."""

    def __call__(self, logp, entropy, labels):
        return logp.detach().exp()


class EntropyWeighting(TokenWeighting):
    """Weight by the (detached) entropy of the predicted distribution; see :func:`entropy`."""

    needs_entropy = True
    normalize_default = True

    def __init__(self, power: float = 1.0):
        self.power = power

    def __call__(self, logp, entropy, labels):
        return entropy.detach().clamp(min=0).pow(self.power)


class HardTokens(TokenWeighting):
    """Keep the top fraction of tokens by loss in each micro-batch; see :func:`hard_tokens`."""

    elementwise = False
    normalize_default = True

    def __init__(self, top_fraction: float = 0.2):
        if not 0 < top_fraction <= 1:
            raise ValueError(f"hard_tokens top_fraction must be in (0, 1], got {top_fraction}")
        self.top_fraction = top_fraction

    def __call__(self, logp, entropy, labels):
        valid = labels != -100
        nll = torch.where(valid, -logp.detach(), torch.full_like(logp, -math.inf))
        k = torch.ceil(valid.sum() * self.top_fraction)
        # Rank by a stable descending sort so ties resolve by position; k stays a tensor (no sync).
        order = torch.sort(nll, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        return (rank < k).to(logp.dtype)


class ResponseOnly(TokenWeighting):
    """Prompt masking: tokens outside responses are ignored; see :func:`response_only`."""

    def __init__(
        self,
        response_template: Sequence[int] | None = None,
        instruction_template: Sequence[int] | None = None,
        mask_key: str = "completion_mask",
    ):
        self.response_template = list(response_template) if response_template else None
        self.instruction_template = list(instruction_template) if instruction_template else None
        self.mask_key = mask_key

    def label_mask(self, labels, extras):
        if self.response_template is None:
            mask = extras.get(self.mask_key)
            if mask is None:
                raise ValueError(
                    f"response_only: no `response_template` given and the batch has no {self.mask_key!r}; pass "
                    "the template token ids, or keep the mask column and patch the model with use_fused_lm_head()"
                )
            return mask.to(labels.device).bool()
        return response_mask(labels, self.response_template, self.instruction_template)


def response_mask(
    tokens: torch.Tensor,
    response_template: Sequence[int],
    instruction_template: Sequence[int] | None = None,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """True on the tokens of responses: after ``response_template``, until ``instruction_template``.

    ``tokens`` is ``[batch, seq]`` (labels or input ids); ``starts`` marks where a new example
    begins inside a row (padding-free batches), which also ends a response.

    Example:
        >>> response_mask(torch.tensor([[5, 7, 8, 1, 2]]), [7, 8]).tolist()
        [[False, False, False, True, True]]
    """
    template = list(response_template)
    # Event codes: 1 where a response begins (just after its template), 2 where an instruction
    # template or a new example begins; a token belongs to a response when the latest event before
    # it is a 1.
    events = _find(tokens, template).roll(len(template), dims=1)
    events[:, : len(template)] = 0
    if instruction_template:
        events = torch.where(_find(tokens, list(instruction_template)) > 0, torch.full_like(events, 2), events)
    if starts is not None:
        events = torch.where(starts.to(tokens.device), torch.full_like(events, 2), events)
    pos = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
    last = torch.where(events > 0, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    code = events.gather(1, last.clamp(min=0))
    return (last >= 0) & (code == 1)


def _find(labels: torch.Tensor, template: list[int]) -> torch.Tensor:
    """1.0 where ``template`` starts in each row of ``labels``."""
    t = torch.as_tensor(template, device=labels.device)
    n = labels.shape[1] - len(template) + 1
    hits = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    if n > 0:
        windows = labels.unfold(1, len(template), 1)
        hits[:, :n] = (windows == t).all(dim=-1).float()
    return hits


class ExampleWeights(TokenWeighting):
    """Per-example (or per-token) weights carried in the batch; see :func:`example_weights`."""

    def __init__(self, key: str = "loss_weights"):
        self.key = key

    def fixed_weights(self, labels, extras):
        w = extras.get(self.key)
        if w is None:
            raise ValueError(
                f"example_weights: the batch has no {self.key!r}; wrap the data collator with "
                "ExampleWeightCollator and patch the model with use_fused_lm_head()"
            )
        w = torch.as_tensor(w, device=labels.device, dtype=torch.float32)
        return w[:, None].expand(labels.shape) if w.dim() == 1 else w


class Custom(TokenWeighting):
    """A user callable ``(logp, entropy, labels) -> weights``; see :func:`custom`."""

    def __init__(self, fn: Callable, elementwise: bool = False, needs_entropy: bool = True, normalize: bool = False):
        self.fn = fn
        self.elementwise = elementwise
        self.needs_entropy = needs_entropy
        self.normalize_default = normalize

    def __call__(self, logp, entropy, labels):
        return self.fn(logp, entropy, labels)


def focal(gamma: float = 2.0, detach: bool = False) -> Focal:
    """Focal loss: ``w = (1 - p_y)^gamma``, down-weighting tokens the model already gets right.

    The gradient flows through the modulating factor as in Lin et al. (2017); ``detach=True`` makes
    it a plain weighting of the cross-entropy gradient instead.

    Example:
        >>> loss_fn = AdaptiveLoss(strategy=focal(2.0))
    """
    return Focal(gamma, detach)


def dft() -> DFT:
    """Dynamic Fine-Tuning (Wu et al., 2025): ``w = stopgrad(p_y)``.

    Example:
        >>> loss_fn = AdaptiveLoss(strategy=dft())
    """
    return DFT()


def entropy(power: float = 1.0) -> EntropyWeighting:
    """Entropy weighting: ``w = H(p)^power`` (nats, detached), favouring uncertain "forking" tokens.

    Normalised to mean one by default so the loss keeps the scale of plain cross-entropy.

    Example:
        >>> loss_fn = AdaptiveLoss(strategy=entropy())
    """
    return EntropyWeighting(power)


def hard_tokens(top_fraction: float = 0.2) -> HardTokens:
    """Train only on the ``top_fraction`` of valid tokens with the highest loss in each micro-batch.

    Normalised to mean one by default (weights ``1 / top_fraction`` on the kept tokens).

    Example:
        >>> loss_fn = AdaptiveLoss(strategy=hard_tokens(0.3))
    """
    return HardTokens(top_fraction)


def response_only(
    response_template: Sequence[int] | None = None,
    instruction_template: Sequence[int] | None = None,
    mask_key: str = "completion_mask",
) -> ResponseOnly:
    """Prompt masking: only tokens after ``response_template`` (until ``instruction_template``) count.

    Masked tokens leave the loss like ``-100`` labels: out of the sum and out of the token count.
    The templates are token-id sequences searched in the labels. Inside a ``Trainer`` the count
    (``num_items_in_batch``) is taken from the batch's labels before the loss runs, so mask them
    in the collator with :class:`~forge.loss.ResponseOnlyCollator` (``from_preset`` does); the
    loss refuses a template together with the Trainer's count. Without a template, a 0/1 mask is
    read from the batch key ``mask_key``.

    Example:
        >>> loss_fn = AdaptiveLoss(strategy=response_only(response_template=[32001]))
    """
    return ResponseOnly(response_template, instruction_template, mask_key)


def example_weights(key: str = "loss_weights") -> ExampleWeights:
    """Per-example weights from a dataset column, carried as batch key ``key`` (see ExampleWeightCollator).

    Example:
        >>> loss_fn = AdaptiveLoss(strategy=example_weights())
    """
    return ExampleWeights(key)


def custom(
    fn: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor],
    elementwise: bool = False,
    needs_entropy: bool = True,
    normalize: bool = False,
) -> Custom:
    """Wrap ``fn(logprobs_of_labels, entropy, labels) -> weights``.

    ``fn`` sees the whole micro-batch (flattened, ignored tokens included with label ``-100``)
    unless ``elementwise=True`` promises each weight depends on its own token only, which lets
    the fused kernel call it chunk by chunk without an extra statistics pass.

    Example:
        >>> loss_fn = AdaptiveLoss(strategy=custom(lambda logp, ent, y: 1 + ent, elementwise=True))
    """
    return Custom(fn, elementwise, needs_entropy, normalize)


STRATEGIES: dict[str, Callable[..., TokenWeighting]] = {
    "focal": focal,
    "dft": dft,
    "entropy": entropy,
    "hard_tokens": hard_tokens,
    "response_only": response_only,
    "example_weights": example_weights,
}


def as_strategies(strategy: Any) -> list[TokenWeighting]:
    """Normalise ``None`` / a strategy / a callable / a name / a list of those to a list."""
    if strategy is None:
        return []
    if isinstance(strategy, (list, tuple)):
        return [s for item in strategy for s in as_strategies(item)]
    if isinstance(strategy, TokenWeighting):
        return [strategy]
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown loss strategy {strategy!r}; choose from {sorted(STRATEGIES)}")
        return [STRATEGIES[strategy]()]
    if callable(strategy):
        return [Custom(strategy)]
    raise TypeError(f"strategy must be a TokenWeighting, a callable, a name or a list, got {type(strategy).__name__}")


class Combined:
    """Product of the predictive strategies' weights, as one ``weight_fn`` for the kernel."""

    def __init__(self, parts: list[TokenWeighting]):
        self.parts = parts
        self.elementwise = all(p.elementwise for p in parts)
        self.needs_entropy = any(p.needs_entropy for p in parts)

    def __call__(self, logp, entropy, labels):
        w = None
        for p in self.parts:
            pw = p(logp, entropy, labels)
            if pw is not None:
                w = pw if w is None else w * pw
        return torch.ones_like(logp) if w is None else w
