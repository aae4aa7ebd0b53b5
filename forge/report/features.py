"""Every forge feature's figures in ``forge report``: the ``forge/<feature>/...`` values that
reached the Trainer's log history (through :func:`forge.core.figures.add_figures`), and the
freeze schedule's changes.

A feature the run did not have logged nothing under its prefix; it becomes a note, not an error.
Figures with several logged points are plotted over steps; a figure logged once (autotune's
choice) is a table row.
"""

from __future__ import annotations

import math
from typing import Any

from forge.core.figures import PREFIX

# (name, title, what turns it on): the features whose figures the report shows besides the monitor's.
FEATURES: list[tuple[str, str, str]] = [
    ("ema", "EMA", "ema: {enabled: true}"),
    ("freeze", "Freezing schedule", "freeze: {enabled: true, schedule: gradual | lp_lora | lisa}"),
    ("loss", "Adaptive loss: token weights", "loss: {strategy: ...}"),
    ("autotune", "Batch autotuning", "autotune: {enabled: true}"),
]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def feature_figures(history: list[dict[str, Any]], feature: str) -> dict[str, dict[str, list[float]]]:
    """``{figure name: {"step": [...], "value": [...]}}`` for one feature's ``forge/<feature>/`` keys.

    Example:
        >>> feature_figures([{"step": 5, "forge/ema/decay": 0.99}], "ema")
        {'decay': {'step': [5], 'value': [0.99]}}
    """
    prefix = f"{PREFIX}{feature}/"
    out: dict[str, dict[str, list[float]]] = {}
    for entry in history:
        for key, value in entry.items():
            number = _number(value)
            if key.startswith(prefix) and number is not None:
                series = out.setdefault(key[len(prefix):], {"step": [], "value": []})
                series["step"].append(entry.get("step") or 0)
                series["value"].append(number)
    return dict(sorted(out.items()))


def schedule_events(schedules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The freeze schedules' changes, in step order: ``step``, ``schedule``, ``period``, ``blocks``.

    Example:
        >>> schedule_events([{"kind": "lisa", "history": [{"step": 0, "period": 0, "blocks": [1, 3]}]}])
        [{'step': 0, 'schedule': 'lisa', 'period': 0, 'blocks': [1, 3]}]
    """
    events = [{"step": change.get("step"), "schedule": record.get("kind"), "period": change.get("period"),
               "blocks": list(change.get("blocks") or [])}
              for record in schedules for change in record.get("history", []) if isinstance(change, dict)]
    return sorted(events, key=lambda e: e["step"] if isinstance(e["step"], int) else 0)


def collect_features(history: list[dict[str, Any]], schedules: list[dict[str, Any]]) -> dict[str, Any]:
    """Per feature: its figures (``None`` when the run did not log any), plus the schedule's changes."""
    out: dict[str, Any] = {name: feature_figures(history, name) or None for name, _, _ in FEATURES}
    out["freeze_events"] = schedule_events(schedules)
    return out
