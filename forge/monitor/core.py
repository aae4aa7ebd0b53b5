"""The state machine behind :class:`forge.monitor.GradientMonitor`.

Device rows come in (one per optimizer step, plus one per measured update), verdicts and
interval metrics come out. Rows stay on the device until :meth:`MonitorCore.sync` copies all of
them in one transfer; the detector then walks them in step order, so its history and the
anomaly log are the same whether a row was synced at once (to gate a step) or at the next log.

Under several processes every row is already global (reduced across ranks as it is made, see
:mod:`forge.monitor.stats`), so every rank's detector sees the same numbers in the same order
and reaches the same verdict: all ranks skip or stop at the same step, with no exchange here.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from forge.monitor.detect import (
    Anomaly,
    AnomalyDetector,
    AnomalyLog,
    GradientAnomalyError,
)
from forge.monitor.stats import ParamPlan, memory_gib
from forge.monitor.summary import PREFIX, build_summary, interval_metrics

# An interval this long is closed into the history even if nobody logs (logging_strategy="no"
# or a plain loop that never flushes), so rows never pile up on the device or the host.
MAX_INTERVAL = 1000


class MonitorCore:
    """Statistics, verdicts, metrics and history for one set of trainable parameters.

    Args:
        config: a ``MonitorConfig``.
        plan: the parameters to watch.
        flops: ``(dense, attention_per_position)`` training FLOPs per token.
        peak_flops: accelerator peak FLOP/s, or None for no MFU.

    Example:
        >>> from forge.monitor import MonitorConfig
        >>> lin = torch.nn.Linear(2, 1)
        >>> lin(torch.ones(1, 2)).sum().backward()
        >>> core = MonitorCore(MonitorConfig(), ParamPlan.build(lin), (0.0, 0.0), None)
        >>> core.record(1, None, None, measure=True); core.verdict()
        'apply'
    """

    def __init__(self, config: Any, plan: ParamPlan, flops: tuple[float, float],
                 peak_flops: float | None):
        self.config, self.plan, self.flops, self.peak_flops = config, plan, flops, peak_flops
        self.is_main = True  # only the main process warns and writes files
        self.loss_scaled = False  # fp16 GradScaler: non-finite steps are its business
        self.detector = AnomalyDetector(config, plan.group_names, plan.names, plan.group_of)
        self.log = AnomalyLog()
        self.history: list[dict[str, float]] = []  # one entry per logging interval
        self.skipped_steps: list[int] = []
        self.consecutive_skips = 0
        self.steps_seen = 0
        self.last_step = 0
        self.amp_overflows = 0
        # Which parameters trained when each row was recorded (a schedule may change them):
        # rows are judged against their own step's mask, whenever they reach the host.
        self._masks: list[list[bool]] = [list(plan.active)]
        self._version = plan.trainable.version if plan.trainable is not None else 0
        self._pending: list[tuple[int, torch.Tensor, int]] = []  # device rows not yet on the host
        self._pending_upd: list[torch.Tensor] = []
        self._rows: list[list[float]] = []  # host rows of the open logging interval
        self._upd_rows: list[list[float]] = []
        self._tokens, self._flop_count, self._t0 = 0, 0.0, time.perf_counter()

    @property
    def has_open_interval(self) -> bool:
        return bool(self._pending or self._rows or self._pending_upd or self._upd_rows)

    def count_forward(self, tokens: int, seq_len: int) -> None:
        """Account for one training forward of ``tokens`` tokens in sequences of ``seq_len``."""
        self._tokens += tokens
        self._flop_count += tokens * (self.flops[0] + self.flops[1] * seq_len)

    def record(self, step: int, loss: torch.Tensor | None, max_norm: float | None, *,
               measure: bool, inv_scale: torch.Tensor | None = None) -> None:
        """Queue this step's gradient row; ``measure`` adds zero counts (logging steps)."""
        if len(self._pending) + len(self._rows) >= MAX_INTERVAL:
            self.flush_metrics()
        self._follow_trainable()
        row = self.plan.grad_row(loss, max_norm, inv_scale, count_zeros=measure)
        self._pending.append((step, row, len(self._masks) - 1))
        self.last_step = step
        self.steps_seen += 1

    def _follow_trainable(self) -> None:
        """Pick up a schedule's change of trainability (one int compare when nothing changed)."""
        ts = self.plan.trainable
        if ts is None or ts.version == self._version:
            return
        self._version = ts.version
        active = [p.requires_grad for p in self.plan.params]
        self.plan.set_active(active)
        self._masks.append(active)

    def record_update(self, before: list[torch.Tensor]) -> None:
        """Queue weight norms and update ratios, given the weights from before the step."""
        self._pending_upd.append(self.plan.update_row(before))

    def verdict(self) -> str:
        """Sync the newest step now and judge it: ``apply`` or ``skip``.

        Raises:
            GradientAnomalyError: a ``stop`` policy fired, or the step would exceed
                ``max_consecutive_skips``.
        """
        step, row, mask = self._pending.pop()
        self.sync()  # older rows first, so history stays in step order
        return self._handle(step, row.tolist(), gate=True, mask=mask)

    def sync(self) -> None:
        """One device-to-host copy of every pending row, then detection over them in order."""
        if not self._pending and not self._pending_upd:
            return
        rows = [r for _, r, _ in self._pending] + self._pending_upd
        flat = torch.cat(rows).tolist()
        pending, self._pending = self._pending, []
        pending_upd, self._pending_upd = self._pending_upd, []
        pos = 0
        for step, row, mask in pending:
            self._handle(step, flat[pos: pos + row.numel()], gate=False, mask=mask)
            pos += row.numel()
        for row in pending_upd:
            self._upd_rows.append(flat[pos: pos + row.numel()])
            pos += row.numel()

    def _handle(self, step: int, values: list[float], gate: bool, mask: int) -> str:
        c, det, lay = self.config, self.detector, self.plan.row_layout()
        active = self._masks[mask]
        loss, _pre, _post, num_bad, culprit = values[lay["scalars"]]
        grad_norm, param_norm = values[lay["group_grad_norm"]], values[lay["param_grad_norm"]]
        self._rows.append(values)
        # fp16 loss scaling overflows now and then by design; GradScaler skips those steps.
        overflow = self.loss_scaled and num_bad > 0
        self.amp_overflows += int(overflow)
        found = [] if overflow else det.detect(step, loss=loss, grad_norm=grad_norm,
                                                param_norm=param_norm, num_bad=num_bad,
                                                culprit=culprit, active=active)
        policies = {getattr(c, "on_" + a.kind) for a in found} if gate else set()
        if self.loss_scaled:
            policies.discard("skip")  # skipping would desynchronise GradScaler; warn instead
        verdict = "stop" if "stop" in policies else "skip" if "skip" in policies else "apply"
        if verdict == "skip" and self.consecutive_skips >= c.max_consecutive_skips:
            verdict = "limit"
        for a in found:
            a.action = {"apply": "warned", "skip": "skipped"}.get(verdict, "stopped")
            self.log.add(a, warn=self.is_main)
        det.commit(loss=loss, grad_norm=grad_norm, param_norm=param_norm,
                   applied=verdict == "apply" and not overflow, active=active)
        if verdict == "skip":
            self.consecutive_skips += 1
            self.skipped_steps.append(step)
        elif verdict == "apply":
            self.consecutive_skips = 0
        else:
            raise GradientAnomalyError(self._stop_message(verdict, step, found), found)
        return verdict

    def _stop_message(self, verdict: str, step: int, found: list[Anomaly]) -> str:
        latest = found[0].message()
        if verdict == "limit":
            return (f"GradientMonitor: stopping at step {step}: {self.consecutive_skips} "
                    f"consecutive optimizer steps were skipped already (max_consecutive_skips="
                    f"{self.config.max_consecutive_skips}). Latest: {latest}. Training is not "
                    f"recovering: lower the learning rate or inspect the data near these steps.")
        kind = next(a.kind for a in found if getattr(self.config, "on_" + a.kind) == "stop")
        return (f"GradientMonitor: stopping at step {step} (on_{kind}='stop'): {latest}. "
                f"This step's update was not applied.")

    def flush_metrics(self) -> dict[str, float]:
        """Close the logging interval: one sync, then its metrics (also added to history)."""
        self.sync()
        if not self._rows and not self._upd_rows:
            return {}
        plan = self.plan
        out = interval_metrics(self._rows, self._upd_rows, plan.group_names,
                               plan.row_layout(), plan.update_layout())
        now = time.perf_counter()
        if self._tokens and now > self._t0:
            out[PREFIX + "tokens_per_second"] = self._tokens / (now - self._t0)
            if self.peak_flops:
                out[PREFIX + "mfu"] = self._flop_count / (now - self._t0) / self.peak_flops
        mem = memory_gib(plan.device)
        if mem is not None:
            out[PREFIX + "memory_allocated_gib"], out[PREFIX + "memory_peak_gib"] = mem
        out[PREFIX + "skipped_steps"] = float(len(self.skipped_steps))
        if self.loss_scaled:
            out[PREFIX + "amp_overflow_steps"] = float(self.amp_overflows)
        out[PREFIX + "anomalies"] = float(self.log.total)
        self.history.append({"step": self.last_step, **out})
        self._rows, self._upd_rows = [], []
        self._tokens, self._flop_count, self._t0 = 0, 0.0, now
        return out

    def summary(self, config: dict[str, Any]) -> dict[str, Any]:
        """The JSON-ready end-of-run summary."""
        self.sync()
        return build_summary(
            history=self.history, group_names=self.plan.group_names,
            anomaly_state=self.log.state_dict(), by_group=self.log.by_group(),
            skipped_steps=self.skipped_steps, steps_observed=self.steps_seen,
            last_step=self.last_step, config=config)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON: history, anomalies, detector state, counters and the open interval."""
        self.sync()
        return {
            "version": 1, "param_names": self.plan.names,
            "history": self.history, "skipped_steps": self.skipped_steps,
            "anomalies": self.log.state_dict(), "detector": self.detector.state_dict(),
            "consecutive_skips": self.consecutive_skips, "steps_seen": self.steps_seen,
            "last_step": self.last_step, "amp_overflows": self.amp_overflows,
            "rows": self._rows, "update_rows": self._upd_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["param_names"] != self.plan.names:
            raise ValueError("GradientMonitor.load_state_dict: the saved state is for a model "
                             "with different trainable parameters")
        self.history = [dict(h) for h in state["history"]]
        self.skipped_steps = list(state["skipped_steps"])
        self.log.load_state_dict(state["anomalies"])
        self.detector.load_state_dict(state["detector"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.steps_seen, self.last_step = int(state["steps_seen"]), int(state["last_step"])
        self.amp_overflows = int(state.get("amp_overflows", 0))
        self._pending, self._pending_upd = [], []
        self._rows = [list(r) for r in state["rows"]]
        self._upd_rows = [list(r) for r in state["update_rows"]]
