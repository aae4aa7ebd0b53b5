"""Host-side anomaly detection and the anomaly log for :mod:`forge.monitor`.

The detector sees one row of numbers per optimizer step, already on the host, and keeps its
running history in plain Python floats, so its state is JSON and survives checkpoints.
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger("forge.monitor")

KINDS = ("nonfinite", "spike", "explode", "vanish", "dead")
_MAX_EVENTS = 1000  # events kept for the summary; counts are kept for all


@dataclass
class Anomaly:
    """One anomaly at one optimizer step.

    Attributes:
        step: the optimizer step (``global_step`` after the step) it happened at.
        kind: one of ``nonfinite``, ``spike``, ``explode``, ``vanish``, ``dead``.
        where: the block (``layer_07``, ``head``, ...), ``loss`` or ``all``.
        param: the culprit parameter's name, when one is to blame.
        value: the offending value (a gradient norm or a loss).
        threshold: the limit it crossed, when there is one.
        detail: a short human explanation.
        action: what the policy did: ``warned``, ``skipped`` or ``stopped``.
    """

    step: int
    kind: str
    where: str
    param: str | None
    value: float
    threshold: float | None = None
    detail: str = ""
    action: str = "warned"

    def message(self) -> str:
        """One line naming the step, the culprit and what was done."""
        who = self.where + (f" ({self.param})" if self.param else "")
        limit = "" if self.threshold is None else f", limit {self.threshold:.4g}"
        return (f"step {self.step}: {self.kind} in {who}: {self.detail} "
                f"(value {self.value:.4g}{limit}); {self.action}")


class GradientAnomalyError(RuntimeError):
    """Training stopped by the gradient monitor before a bad update reached the weights.

    Raised when an anomaly's policy is ``stop``, or when skipping one more step would exceed
    ``max_consecutive_skips``. The end-of-run summary has been written when it is raised.

    Attributes:
        anomalies: what was found at the step that stopped training.

    Example:
        >>> try:
        ...     trainer.train()  # doctest: +SKIP
        ... except GradientAnomalyError as err:
        ...     print(err.anomalies[0].param)  # the culprit parameter's name
    """

    def __init__(self, message: str, anomalies: list[Anomaly]):
        super().__init__(message)
        self.anomalies = anomalies


class AnomalyDetector:
    """Flags non-finite gradients, exploding/vanishing blocks, loss spikes and dead gradients.

    Exploding and vanishing are judged against each block's own running geometric mean of
    gradient norms (an EMA of ``log ||g||``), spikes by a robust z-score of the loss against
    its recent level and the MAD of step-to-step changes over a window, dead gradients by a
    run of exactly-zero gradients. :meth:`detect` only looks; :meth:`commit` then adds the
    step to the history, unless the step was skipped (its numbers must not teach the detector
    what normal is).

    Example:
        >>> from forge.monitor import MonitorConfig
        >>> det = AnomalyDetector(MonitorConfig(), ["layer_00"], ["w"], [0])
        >>> det.detect(1, loss=2.0, grad_norm=[1.0], param_norm=[1.0], num_bad=0, culprit=0)
        []
    """

    def __init__(self, config: Any, group_names: list[str], param_names: list[str],
                 param_group: list[int]):
        self.config = config
        self.group_names = group_names
        self.param_names = param_names
        self.param_group = param_group
        self.members = [[i for i, g in enumerate(param_group) if g == k]
                        for k in range(len(group_names))]
        self.log_ema: list[float | None] = [None] * len(group_names)
        self.seen: list[int] = [0] * len(group_names)
        self.losses: deque[float] = deque(maxlen=config.spike_window)
        self.zero_run: list[int] = [0] * len(param_names)

    def detect(self, step: int, *, loss: float, grad_norm: list[float], param_norm: list[float],
               num_bad: float, culprit: float, active: list[bool] | None = None) -> list[Anomaly]:
        """Anomalies of one step, without changing any history.

        ``active`` says which parameters trained at this step (default: all); frozen ones
        have no gradient by design and are never called dead.
        """
        c = self.config
        if num_bad > 0:
            i = int(culprit)
            bad = int(num_bad)
            detail = ("NaN" if math.isnan(param_norm[i]) else "inf") + " gradient"
            if bad > 1:
                detail += f" ({bad - 1} more parameter{'s' if bad > 2 else ''} non-finite)"
            return [Anomaly(step, "nonfinite", self.group_names[self.param_group[i]],
                            self.param_names[i], param_norm[i], None, detail)]
        if not math.isnan(loss) and not math.isfinite(loss):
            return [Anomaly(step, "nonfinite", "loss", None, loss, None, "infinite loss")]
        found: list[Anomaly] = []
        for g, value in enumerate(grad_norm):
            if value == 0.0:
                continue  # an all-zero block is reported as dead, not as vanishing
            ref = math.exp(self.log_ema[g]) if (
                self.log_ema[g] is not None and self.seen[g] >= c.warmup_steps) else None
            top = self._largest_param(g, param_norm)
            if c.grad_norm_max is not None and value > c.grad_norm_max:
                found.append(Anomaly(step, "explode", self.group_names[g], top, value,
                                     c.grad_norm_max, "gradient norm above the absolute limit"))
            elif ref is not None and value > c.explode_factor * ref:
                found.append(Anomaly(step, "explode", self.group_names[g], top, value,
                                     c.explode_factor * ref,
                                     f"gradient norm {value / ref:.3g}x its running mean"))
            if c.grad_norm_min is not None and value < c.grad_norm_min:
                found.append(Anomaly(step, "vanish", self.group_names[g], None, value,
                                     c.grad_norm_min, "gradient norm below the absolute limit"))
            elif ref is not None and value < c.vanish_factor * ref:
                found.append(Anomaly(step, "vanish", self.group_names[g], None, value,
                                     c.vanish_factor * ref,
                                     f"gradient norm {value / ref:.3g}x its running mean"))
        spike = self._spike(step, loss)
        if spike is not None:
            found.append(spike)
        found.extend(self._dead(step, param_norm, active))
        return found

    def _largest_param(self, g: int, param_norm: list[float]) -> str | None:
        members = self.members[g]
        return self.param_names[max(members, key=lambda i: param_norm[i])] if members else None

    def _spike(self, step: int, loss: float) -> Anomaly | None:
        c = self.config
        if not math.isfinite(loss) or len(self.losses) < max(3, c.warmup_steps):
            return None
        losses = list(self.losses)
        # The level is the median of the last 3 losses, not of the whole window: a loss that
        # falls fast would leave a window median far behind and hide real spikes. The noise
        # scale is the MAD of step-to-step changes over the window, which a steady trend does
        # not inflate; 1.4826 MAD estimates a normal standard deviation, and the 1 % floor
        # keeps a smooth curve from flagging every wiggle.
        level = statistics.median(losses[-3:])
        diffs = [b - a for a, b in itertools.pairwise(losses)]
        mid = statistics.median(diffs)
        mad = statistics.median(abs(d - mid) for d in diffs)
        scale = max(1.4826 * mad, 0.01 * abs(level), 1e-12)
        z = (loss - level) / scale
        if z <= c.spike_zscore:
            return None
        return Anomaly(step, "spike", "loss", None, loss, level + c.spike_zscore * scale,
                       f"loss {z:.1f} robust standard deviations above its recent level "
                       f"(window of {len(losses)} steps)")

    def _dead(self, step: int, param_norm: list[float], active: list[bool] | None) -> list[Anomaly]:
        patience = self.config.dead_patience
        live = [i for i in range(len(param_norm)) if active is None or active[i]]
        dead = {i for i in live if param_norm[i] == 0.0 and self.zero_run[i] + 1 >= patience}
        if not dead:
            return []
        if len(dead) == len(live):
            return [Anomaly(step, "dead", "all", None, 0.0, None,
                            f"every trainable parameter had an all-zero gradient for "
                            f"{patience}+ steps")]
        out = []
        for g, members in enumerate(self.members):
            members = [i for i in members if active is None or active[i]]
            if members and all(i in dead for i in members):
                out.append(Anomaly(step, "dead", self.group_names[g], None, 0.0, None,
                                   f"all {len(members)} trainable parameters had all-zero "
                                   f"gradients for {patience}+ steps"))
            else:
                out.extend(Anomaly(step, "dead", self.group_names[g], self.param_names[i], 0.0,
                                   None, f"all-zero gradient for {patience}+ steps")
                           for i in members if i in dead)
        return out

    def commit(self, *, loss: float, grad_norm: list[float], param_norm: list[float],
               applied: bool, active: list[bool] | None = None) -> None:
        """Add one step to the history; skipped steps only extend zero-gradient runs (a
        frozen parameter's run starts over: it was not given the chance to learn)."""
        for i, v in enumerate(param_norm):
            live = active is None or active[i]
            self.zero_run[i] = self.zero_run[i] + 1 if (v == 0.0 and live) else 0
        if not applied:
            return
        beta = self.config.history_beta
        for g, value in enumerate(grad_norm):
            if value > 0 and math.isfinite(value):
                lv = math.log(value)
                prev = self.log_ema[g]
                self.log_ema[g] = lv if prev is None else beta * prev + (1 - beta) * lv
                self.seen[g] += 1
        if math.isfinite(loss):
            self.losses.append(loss)

    def state_dict(self) -> dict[str, Any]:
        return {"log_ema": list(self.log_ema), "seen": list(self.seen),
                "losses": list(self.losses), "zero_run": list(self.zero_run)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_ema = list(state["log_ema"])
        self.seen = list(state["seen"])
        self.losses = deque(state["losses"], maxlen=self.config.spike_window)
        self.zero_run = list(state["zero_run"])


class AnomalyLog:
    """Every anomaly counted by ``(kind, where, param)``; each such key is warned about once.

    Example:
        >>> log = AnomalyLog()
        >>> log.add(Anomaly(3, "spike", "loss", None, 9.0), warn=False)
        >>> log.total, log.records[0]["first_step"]
        (1, 3)
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []  # one per key, in order of first appearance
        self.events: list[dict[str, Any]] = []  # the first _MAX_EVENTS anomalies, in order
        self.total = 0
        self._index: dict[tuple[str, str, str | None], int] = {}

    def add(self, anomaly: Anomaly, warn: bool = True) -> None:
        self.total += 1
        if len(self.events) < _MAX_EVENTS:
            self.events.append(asdict(anomaly))
        key = (anomaly.kind, anomaly.where, anomaly.param)
        pos = self._index.get(key)
        if pos is None:
            self._index[key] = len(self.records)
            self.records.append({"kind": anomaly.kind, "where": anomaly.where,
                                 "param": anomaly.param, "first_step": anomaly.step,
                                 "last_step": anomaly.step, "count": 1,
                                 "first_message": anomaly.message(),
                                 "actions": {anomaly.action: 1}})
            if warn:  # later repeats only count, so a dead layer does not flood the log
                logger.warning("GradientMonitor: %s", anomaly.message())
        else:
            rec = self.records[pos]
            rec["last_step"] = anomaly.step
            rec["count"] += 1
            rec["actions"][anomaly.action] = rec["actions"].get(anomaly.action, 0) + 1

    def by_group(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rec in self.records:
            out[rec["where"]] = out.get(rec["where"], 0) + rec["count"]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records, "events": self.events, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = [dict(r) for r in state["records"]]
        self.events = [dict(e) for e in state["events"]]
        self.total = int(state["total"])
        self._index = {(r["kind"], r["where"], r["param"]): i for i, r in enumerate(self.records)}
