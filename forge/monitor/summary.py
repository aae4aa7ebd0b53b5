"""Interval metrics, the end-of-run summary and its console table for :mod:`forge.monitor`."""

from __future__ import annotations

import math
import statistics
from typing import Any

from forge.core.figures import PREFIX

_TOP_K = 5  # blocks shown in the console table


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def interval_metrics(
    grad_rows: list[list[float]],
    update_rows: list[list[float]],
    group_names: list[str],
    layout: dict[str, slice],
    update_layout: dict[str, slice],
    *,
    per_group: bool = True,
) -> dict[str, float]:
    """Means over the steps of one logging interval (non-finite values left out).

    Weight norms and update ratios come from the steps where they were measured, usually
    only the last step of the interval.
    """
    out: dict[str, float] = {}
    if grad_rows:
        cols = list(zip(*grad_rows))
        s = layout["scalars"].start
        out[PREFIX + "loss"] = _mean(list(cols[s]))
        out[PREFIX + "grad_norm_preclip"] = _mean(list(cols[s + 1]))
        out[PREFIX + "grad_norm_postclip"] = _mean(list(cols[s + 2]))
        if per_group:
            g0, z0 = layout["group_grad_norm"].start, layout["group_zero_frac"].start
            for k, name in enumerate(group_names):
                out[f"{PREFIX}grad_norm/{name}"] = _mean(list(cols[g0 + k]))
                zero = _mean(list(cols[z0 + k]))
                if math.isfinite(zero):  # NaN: not measured in this interval (detail_every)
                    out[f"{PREFIX}zero_grad_frac/{name}"] = zero
    if update_rows:
        cols = list(zip(*update_rows))
        s = update_layout["scalars"].start
        out[PREFIX + "weight_norm"] = _mean(list(cols[s]))
        out[PREFIX + "update_ratio"] = _mean(list(cols[s + 1]))
        if per_group:
            w0 = update_layout["group_weight_norm"].start
            r0 = update_layout["group_update_ratio"].start
            for k, name in enumerate(group_names):
                out[f"{PREFIX}weight_norm/{name}"] = _mean(list(cols[w0 + k]))
                out[f"{PREFIX}update_ratio/{name}"] = _mean(list(cols[r0 + k]))
    return {k: v for k, v in out.items() if not math.isnan(v)}


def _group_rows(history: list[dict[str, Any]], group_names: list[str],
                by_group: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    for name in group_names:
        norms = [h[f"{PREFIX}grad_norm/{name}"] for h in history
                 if math.isfinite(h.get(f"{PREFIX}grad_norm/{name}", float("nan")))]
        ratios = [h[f"{PREFIX}update_ratio/{name}"] for h in history
                  if f"{PREFIX}update_ratio/{name}" in h]
        zeros = [h[f"{PREFIX}zero_grad_frac/{name}"] for h in history
                 if f"{PREFIX}zero_grad_frac/{name}" in h]
        median = statistics.median(norms) if norms else float("nan")
        peak = max(norms) if norms else float("nan")
        rows.append({
            "name": name,
            "grad_norm_last": norms[-1] if norms else None,
            "grad_norm_median": median if norms else None,
            "grad_norm_max": peak if norms else None,
            # How far the worst interval stood above the typical one: the spikiest blocks first.
            "max_over_median": peak / median if norms and median > 0 else None,
            "update_ratio_last": ratios[-1] if ratios else None,
            "zero_grad_frac_mean": _mean(zeros) if zeros else None,
            "anomalies": by_group.get(name, 0),
        })
    return rows


def build_summary(*, history: list[dict[str, Any]], group_names: list[str],
                  anomaly_state: dict[str, Any], by_group: dict[str, int],
                  skipped_steps: list[int], steps_observed: int, last_step: int,
                  config: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready end-of-run summary: per-block health, anomalies and the metric history."""
    groups = _group_rows(history, group_names, by_group)
    worst = sorted(groups, key=lambda r: (-r["anomalies"], -(r["max_over_median"] or 0.0)))
    return {
        "version": 1,
        "steps_observed": steps_observed,
        "last_step": last_step,
        "skipped_steps": list(skipped_steps),
        "anomaly_total": anomaly_state["total"],
        "anomalies": anomaly_state["records"],
        "events": anomaly_state["events"],
        "worst_groups": [r["name"] for r in worst[:_TOP_K]],
        "groups": groups,
        "history": history,
        "config": config,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_summary(summary: dict[str, Any], path: str | None = None) -> str:
    """A short console table: the worst blocks, then each kind of anomaly with its steps."""
    head = (f"GradientMonitor: {summary['steps_observed']} steps observed, "
            f"{len(summary['skipped_steps'])} skipped, {summary['anomaly_total']} anomalies")
    lines = [head + (f" (summary: {path})" if path else "")]
    lines.append(f"  {'block':<18}{'grad norm':>11}{'max/median':>12}{'update/weight':>15}"
                 f"{'zero grad':>11}{'anomalies':>11}")
    by_name = {g["name"]: g for g in summary["groups"]}
    for name in summary["worst_groups"]:
        g = by_name[name]
        zero = None if g["zero_grad_frac_mean"] is None else 100 * g["zero_grad_frac_mean"]
        lines.append(f"  {name:<18}{_fmt(g['grad_norm_last'], '.3e'):>11}"
                     f"{_fmt(g['max_over_median'], '.2f'):>12}"
                     f"{_fmt(g['update_ratio_last'], '.2e'):>15}"
                     f"{_fmt(zero, '.1f') + ('%' if zero is not None else ''):>11}"
                     f"{g['anomalies']:>11}")
    if summary["anomalies"]:
        lines.append("  anomalies (first occurrence, count, steps):")
        for rec in summary["anomalies"][:10]:
            lines.append(f"    x{rec['count']} steps {rec['first_step']}-{rec['last_step']}: "
                         f"{rec['first_message']}")
        if len(summary["anomalies"]) > 10:
            lines.append(f"    ... {len(summary['anomalies']) - 10} more in the JSON summary")
    return "\n".join(lines)
