"""What the trackers show of the token-level loss (``forge/loss/...``): statistics of the
per-token weights the strategies produced, and the share of tokens that were supervised.

The statistics accumulate on the device as the weights are computed (no host sync in the
step); :meth:`WeightStats.figures` reads them once per logging interval and starts over.
:class:`~forge.loss.LossCallback` puts them into the logs.
"""

from __future__ import annotations

from typing import Any

import torch


class WeightStats:
    """Running sum, min, max and clamped count of token weights, and supervised tokens.

    Example:
        >>> stats = WeightStats()
        >>> stats.add(torch.tensor([0.5, 2.0]), clamp_max=1.0)
        >>> stats.figures()["forge/loss/weight_max"]
        2.0
    """

    def __init__(self) -> None:
        self._acc: torch.Tensor | None = None  # [sum, count, clamped, min, max, supervised, seen]

    @torch.no_grad()
    def add(self, weights: torch.Tensor, clamp_min: float | None = None, clamp_max: float | None = None) -> None:
        """Fold in the raw (pre-clamp) weights of the supervised tokens of one chunk."""
        w = weights.detach().float().reshape(-1)
        if w.numel() == 0:
            return
        clamped = torch.zeros((), device=w.device)
        if clamp_min is not None:
            clamped = clamped + (w < clamp_min).sum()
        if clamp_max is not None:
            clamped = clamped + (w > clamp_max).sum()
        row = torch.stack([w.sum(), torch.tensor(float(w.numel()), device=w.device), clamped,
                           w.min(), w.max(), torch.zeros((), device=w.device), torch.zeros((), device=w.device)])
        self._fold(row)

    @torch.no_grad()
    def add_tokens(self, supervised: torch.Tensor, seen: int) -> None:
        """Count supervised tokens (labels that are not ignored) out of ``seen`` predicted ones."""
        device = supervised.device
        inf = torch.tensor(float("inf"), device=device)
        row = torch.stack([torch.zeros((), device=device), torch.zeros((), device=device),
                           torch.zeros((), device=device), inf, -inf, supervised.float().reshape(()),
                           torch.tensor(float(seen), device=device)])
        self._fold(row)

    def _fold(self, row: torch.Tensor) -> None:
        if self._acc is None or self._acc.device != row.device:
            self._acc = row
            return
        acc = self._acc
        self._acc = torch.cat([acc[:3] + row[:3], torch.minimum(acc[3:4], row[3:4]),
                               torch.maximum(acc[4:5], row[4:5]), acc[5:] + row[5:]])

    def figures(self) -> dict[str, float]:
        """The interval's figures (one host copy), then a fresh interval."""
        if self._acc is None:
            return {}
        total, count, clamped, low, high, supervised, seen = self._acc.tolist()
        self._acc = None
        out: dict[str, float] = {}
        if seen:
            out["forge/loss/supervised_fraction"] = supervised / seen
        if count:
            out.update({"forge/loss/weight_mean": total / count, "forge/loss/weight_min": low,
                        "forge/loss/weight_max": high, "forge/loss/clamped_fraction": clamped / count})
        return out


class RecordedWeights:
    """A ``weight_fn`` that also records what it returns (gradients pass through untouched)."""

    def __init__(self, weight_fn: Any, stats: WeightStats, clamp_min: float | None, clamp_max: float | None):
        self.weight_fn, self.stats = weight_fn, stats
        self.clamp_min, self.clamp_max = clamp_min, clamp_max
        self.elementwise = getattr(weight_fn, "elementwise", True)
        self.needs_entropy = getattr(weight_fn, "needs_entropy", False)

    @property
    def unrecorded(self) -> Any:
        """The weight function itself, for a second evaluation that must not count again."""
        return self.weight_fn

    def __call__(self, logp, entropy, labels):
        w = self.weight_fn(logp, entropy, labels)
        self.stats.add(torch.as_tensor(w).expand_as(logp), self.clamp_min, self.clamp_max)
        return w
