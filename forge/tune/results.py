"""The results of a sweep: one row per trial, as ``results.csv`` and a ``report.html`` page.

The table is rebuilt from the Optuna study after every trial, so it is complete after an
interrupt too. The objective is the final evaluation loss (for a pruned trial, the last one
reported); the best trial is the completed trial with the lowest.

Example:
    >>> rows = trial_rows(study, space)
    >>> write_results(rows, space, "outputs/sweep-lora")
"""

from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path
from typing import Any

from forge.core.io import atomic_write_text

OBJECTIVE = "eval_loss"
RESULTS_FILE = "results.csv"
REPORT_FILE = "report.html"
_TAIL = ("train_loss", "steps", "seconds", "output_dir", "note")


def trial_rows(study: Any, keys: list[str]) -> list[dict[str, Any]]:
    """One dict per trial: number, state, objective, each searched key, and what the run reported."""
    rows = []
    for t in study.trials:
        value = t.value if t.value is not None else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        attrs = t.user_attrs
        note = attrs.get("error") or attrs.get("pruned") or ("interrupted" if t.state.name == "FAIL" else "")
        rows.append({"trial": t.number, "state": t.state.name.lower(), OBJECTIVE: value,
                     **{k: t.params.get(k) for k in keys},
                     **{k: attrs.get(k) for k in _TAIL if k != "note"}, "note": note})
    return rows


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the lowest objective (None before one completes)."""
    done = [r for r in rows if r["state"] == "complete" and isinstance(r[OBJECTIVE], (int, float))
            and math.isfinite(r[OBJECTIVE])]
    return min(done, key=lambda r: r[OBJECTIVE]) if done else None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_results(rows: list[dict[str, Any]], keys: list[str], sweep_dir: str | Path) -> None:
    """``results.csv`` (every trial) and ``report.html`` (sorted by objective, best marked)."""
    out = Path(sweep_dir)
    columns = ["trial", "state", OBJECTIVE, *keys, *_TAIL]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) if row.get(k) is not None else "" for k in columns})
    atomic_write_text(out / RESULTS_FILE, buf.getvalue())
    atomic_write_text(out / REPORT_FILE, _page(rows, keys, columns, out))


def format_table(rows: list[dict[str, Any]], keys: list[str], limit: int = 10) -> str:
    """The best ``limit`` trials as aligned text (for the terminal)."""
    ranked = sorted(rows, key=lambda r: (r["state"] != "complete", r[OBJECTIVE] is None,
                                         r[OBJECTIVE] if r[OBJECTIVE] is not None else 0.0))[:limit]
    columns = ["trial", "state", OBJECTIVE, *keys]
    table = [columns] + [[_fmt(r.get(c)) for c in columns] for r in ranked]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)


def _page(rows: list[dict[str, Any]], keys: list[str], columns: list[str], out: Path) -> str:
    esc = html.escape
    best = best_row(rows)
    ranked = sorted(rows, key=lambda r: (r["state"] != "complete", r[OBJECTIVE] is None,
                                         r[OBJECTIVE] if r[OBJECTIVE] is not None else 0.0))
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        f"<tr{' class=best' if best is not None and r['trial'] == best['trial'] else ''}>"
        + "".join(f"<td>{esc(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in ranked)
    chosen = ("<p>Best: trial {}, {} = {}. Train it with <code>{}</code>.</p>".format(
        best["trial"], OBJECTIVE, esc(_fmt(best[OBJECTIVE])),
        esc(" ".join(f"--set {k}={_fmt(best[k])}" for k in keys))) if best else "<p>No trial has completed yet.</p>")
    done = sum(r["state"] == "complete" for r in rows)
    pruned = sum(r["state"] == "pruned" for r in rows)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>forge sweep: {esc(out.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ text-align: left; padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; }}
tr.best {{ background: #e6f4e6; font-weight: bold; }}
</style></head><body>
<h1>forge sweep: {esc(out.name)}</h1>
<p>{len(rows)} trials: {done} complete, {pruned} pruned; objective {OBJECTIVE} (lower is better), from
<code>{RESULTS_FILE}</code> in <code>{esc(str(out))}</code>.</p>
{chosen}
<table><tr>{head}</tr>{body}</table>
</body></html>
"""
