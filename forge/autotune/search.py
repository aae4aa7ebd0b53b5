"""The batch-size search of :mod:`forge.autotune`, free of torch: probes in, a choice out.

Peak memory of one training step is close to linear in the batch size for a fixed sequence
length (weights, gradients and optimizer state are fixed; activations scale with the batch).
So instead of bisecting on failures, the search measures two small batches, fits
``bytes = intercept + per_sample * batch``, refines the fit once with a probe at about a
quarter of the predicted limit when the extrapolation is long, confirms the batch it will
actually use, and backs off once along the secant through the failure when that probe does
not fit. At most five probes, and a failed one is always followed by a smaller batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_PROBES = 5
# Refine the fit when the prediction lies this many times beyond the largest probe: the
# slope error of two neighbouring small batches is multiplied by the extrapolation length.
REFINE_RATIO = 4

# A measurement: peak bytes of one step at a batch size, or None when it ran out of memory; or
# (peak bytes, the part of it that grows with the batch, to fit the line on).
Measure = Callable[[int], "int | tuple[int, int] | None"]


@dataclass
class Probe:
    """One real step at one batch size.

    Attributes:
        batch_size: examples per device in the probe.
        bytes: measured peak memory, or None when the step ran out of memory.
        ok: whether it fit the budget.
        role: ``fit``, ``refine``, ``confirm`` or ``back-off``.
        seconds: wall time of the probe.
        fit_bytes: the bytes the line is fitted on (default ``bytes``): a step's peak is the
            larger of its forward/backward (linear in the batch) and its optimizer step (fixed),
            so small probes can sit on the flat part and must not flatten the line.

    Example:
        >>> Probe(batch_size=4, bytes=3_000_000, ok=True, role="fit").ok
        True
    """

    batch_size: int
    bytes: int | None
    ok: bool
    role: str = "fit"
    seconds: float = 0.0
    fit_bytes: int | None = None

    @property
    def line_bytes(self) -> int | None:
        """What the fit uses: ``fit_bytes`` when the measurement gave it, else ``bytes``."""
        return self.fit_bytes if self.fit_bytes is not None else self.bytes


@dataclass
class LinearFit:
    """``bytes = intercept + per_sample * batch``, least squares over the fitting probes."""

    intercept: float
    per_sample: float

    def predict(self, batch: float) -> float:
        """Bytes of one step at ``batch``."""
        return self.intercept + self.per_sample * batch

    def largest_under(self, budget: float) -> int:
        """The largest batch the line keeps at or under ``budget`` (0 when none)."""
        if self.per_sample <= 0:
            return 1 << 30 if self.intercept <= budget else 0
        return max(0, math.floor((budget - self.intercept) / self.per_sample + 1e-9))


def fit_line(points: list[tuple[int, int]]) -> LinearFit:
    """Least-squares line through ``(batch, bytes)`` points (two or more distinct batches).

    Example:
        >>> round(fit_line([(1, 110), (2, 120), (4, 140)]).per_sample, 6)
        10.0
    """
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((b - mean_b) ** 2 for b, _ in points)
    cov = sum((b - mean_b) * (m - mean_m) for b, m in points)
    slope = cov / var if var else 0.0
    return LinearFit(intercept=mean_m - slope * mean_b, per_sample=slope)


@dataclass
class SearchOutcome:
    """What :func:`search_batch_size` found.

    Attributes:
        batch_size: the per-device batch to use (0: not even one example fits).
        limit: the memory model's largest batch under the budget with the margin (capped).
        probes: every probe, in order.
        fit: the last fitted line, or None when fewer than two probes fit.
        backed_off: the confirm probe failed and a smaller batch was taken.
    """

    batch_size: int
    limit: int
    probes: list[Probe] = field(default_factory=list)
    fit: LinearFit | None = None
    backed_off: bool = False


def search_batch_size(
    measure: Measure,
    budget: int,
    *,
    cap: int,
    margin: float = 0.05,
    pick: Callable[[int], int] = lambda limit: limit,
) -> SearchOutcome:
    """Find the per-device batch to train with in at most five measured steps.

    Args:
        measure: runs one real step at a batch size and returns its peak bytes, or None
            when it ran out of memory. A measurement above ``budget`` also counts as a failure.
            It may return ``(peak, linear)`` instead: the line is then fitted on ``linear``
            (the forward/backward peak), the budget still checked against ``peak``.
        budget: bytes a step may use.
        cap: never probe or choose more than this (e.g. the per-device share of the
            target global batch, or the data set size).
        margin: fraction of ``budget`` the prediction keeps free for what a single probe
            cannot see (allocator fragmentation, longer transients later in the run).
        pick: maps the memory limit to the batch the run will really use (e.g. the
            largest one that divides the global batch); that batch is the one confirmed.

    Returns:
        A :class:`SearchOutcome`; ``batch_size`` always fit in a probe, or is below one
        that did.

    Example:
        >>> out = search_batch_size(lambda b: 100 + 10 * b, budget=1100, cap=1000)
        >>> out.batch_size, len(out.probes)
        (94, 4)
    """
    probes: list[Probe] = []
    target = budget * (1.0 - margin)

    def run(batch: int, role: str) -> Probe:
        start = time.perf_counter()
        peak = measure(batch)
        linear = None
        if isinstance(peak, tuple):
            peak, linear = peak
        ok = peak is not None and peak <= budget
        probe = Probe(batch, peak, ok, role, time.perf_counter() - start, fit_bytes=linear)
        probes.append(probe)
        return probe

    def largest_ok() -> int:
        return max((p.batch_size for p in probes if p.ok), default=0)

    def smallest_failed() -> int:
        return min((p.batch_size for p in probes if not p.ok), default=cap + 1)

    def fitted() -> LinearFit | None:
        points = [(p.batch_size, p.line_bytes) for p in probes if p.ok and p.bytes is not None]
        return fit_line(points) if len({b for b, _ in points}) >= 2 else None

    cap = max(1, cap)
    if not run(1, "fit").ok:
        return SearchOutcome(0, 0, probes)
    if cap == 1:
        return SearchOutcome(1, 1, probes)
    if not run(2, "fit").ok:
        return SearchOutcome(pick(1), 1, probes)

    line = fitted()
    raw = line.largest_under(target) if line else cap
    if raw < 2 * cap and raw > REFINE_RATIO * largest_ok():
        # Long extrapolation close to where we will ask for: measure a quarter of the way.
        refine = max(3, raw // REFINE_RATIO)
        run(refine, "refine")
        line = fitted() or line
        raw = line.largest_under(target)
    limit = max(1, min(raw, cap, smallest_failed() - 1))
    choice = pick(limit)
    if choice <= largest_ok():
        return SearchOutcome(choice, limit, probes, line)
    confirm = run(choice, "confirm")
    if confirm.ok:
        return SearchOutcome(choice, limit, probes, fitted() or line)

    # Back off once along the secant from the largest batch that fit to the failure. A
    # failure without a measurement (a real OOM) is placed at the budget: the true curve
    # lies above that point, so the margin keeps the retry below it.
    base = largest_ok()
    base_bytes = max(p.line_bytes for p in probes if p.ok and p.batch_size == base)
    over = confirm.line_bytes if confirm.bytes is not None else budget
    slope = max((over - base_bytes) / (confirm.batch_size - base), 1e-9)
    limit = base + math.floor(max(target - base_bytes, 0) / slope)
    limit = max(1, min(limit, confirm.batch_size - 1))
    choice = pick(limit)
    if choice <= base or run(choice, "back-off").ok:
        return SearchOutcome(choice, limit, probes, fitted() or line, backed_off=True)
    # Still too big: fall back to the largest batch that fit, without another probe.
    limit = largest_ok()
    return SearchOutcome(pick(limit), limit, probes, fitted() or line, backed_off=True)


def accumulation_for(per_device: int, target: int | None, world_size: int = 1) -> int:
    """Accumulation steps that bring ``per_device * steps * world_size`` closest to ``target``.

    Example:
        >>> accumulation_for(16, 64, world_size=2)
        2
    """
    if target is None:
        return 1
    return max(1, round(target / (world_size * per_device)))


def split_global_batch(limit: int, target: int | None, world_size: int = 1) -> tuple[int, int, int]:
    """Per-device batch and accumulation steps for a global batch, given a memory limit.

    Exact when some per-device batch between half the limit and the limit divides the
    per-device share; otherwise the global batch closest to the target (ties to the larger
    per-device batch). Never goes below half the limit just to hit the target exactly: a
    much smaller per-device batch wastes the memory the search found.

    Args:
        limit: largest per-device batch that fits.
        target: wanted ``per_device * accumulation * world_size``; None maximises the
            per-device batch with no accumulation.
        world_size: number of data-parallel processes.

    Returns:
        ``(per_device_train_batch_size, gradient_accumulation_steps, global_batch)``.

    Example:
        >>> split_global_batch(40, 64, world_size=1)
        (32, 2, 64)
        >>> split_global_batch(40, 64, world_size=4)
        (16, 1, 64)
    """
    limit = max(1, limit)
    if target is None:
        return limit, 1, limit * world_size
    hi = max(1, min(limit, math.ceil(target / world_size)))
    best: tuple[int, int, int] | None = None
    for per_device in range(hi, (hi + 1) // 2 - 1, -1):
        steps = accumulation_for(per_device, target, world_size)
        error = abs(per_device * steps * world_size - target)
        if best is None or error < best[0]:
            best = (error, per_device, steps)
        if error == 0:
            break
    _, per_device, steps = best
    return per_device, steps, per_device * steps * world_size
