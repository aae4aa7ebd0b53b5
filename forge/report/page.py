"""The HTML page of ``forge report``: series from a run's files, plots, one self-contained file."""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any

from forge.core.figures import PREFIX
from forge.core.io import atomic_write_bytes, atomic_write_text, json_safe
from forge.core.paths import STATE_FILE
from forge.report.doctor import doctor_section
from forge.report.features import FEATURES, collect_features
from forge.report.files import MONITOR_FILE, RunFiles, load_run

_NORM_KEY = re.compile(rf"^{re.escape(PREFIX)}grad_norm/(.+)$")


def _series(history: list[dict[str, Any]], key: str) -> dict[str, list[float]] | None:
    points = [(e["step"], float(e[key])) for e in history
              if isinstance(e.get(key), (int, float)) and not isinstance(e.get(key), bool)]
    if not points:
        return None
    return {"step": [p[0] for p in points], "value": [p[1] for p in points]}


def _first_series(history: list[dict[str, Any]], names: list[str]) -> dict[str, list[float]] | None:
    for name in names:
        found = _series(history, name)
        if found:
            return found
    return None


# Input side at the top of the heat map, output side below: the groups of forge.core.trainable.
_GROUP_RANK = {"vision": 0, "embeddings": 1, "norm": 3, "head": 4, "other": 5}


def _block_order(name: str) -> tuple[int, str]:
    return (_GROUP_RANK.get(name, 2), name)


def _heatmap(run: RunFiles) -> dict[str, Any] | None:
    """Per-block gradient norms over logging steps: from the log history, else the monitor."""
    for rows, source in ((run.log_history, STATE_FILE),
                         ((run.monitor or {}).get("history", []), MONITOR_FILE)):
        rows = [r for r in rows if any(_NORM_KEY.match(k) for k in r)]
        if not rows:
            continue
        blocks = sorted({m.group(1) for r in rows for k in r if (m := _NORM_KEY.match(k))},
                        key=_block_order)
        values = []
        for block in blocks:
            line = []
            for r in rows:
                v = r.get(f"{PREFIX}grad_norm/{block}")
                line.append(float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None)
            values.append(line)
        return {"blocks": blocks, "steps": [r["step"] for r in rows], "values": values,
                "source": source}
    return None


def collect_series(run: RunFiles) -> dict[str, Any]:
    """Every series the report plots, from the run's files (``None`` where not recorded).

    This is what the plots draw and what the HTML embeds as JSON (``id="forge-series"``).
    """
    hist = run.log_history
    monitor = run.monitor or {}
    monitor_rows = monitor.get("history", [])
    throughput = {}
    for name in ("tokens_per_second", "mfu"):
        keys = [PREFIX + name]
        throughput[name] = _first_series(hist, keys) or _first_series(monitor_rows, keys)
    anomalies = [{k: e.get(k) for k in ("step", "kind", "where", "action")}
                 for e in monitor.get("events", [])]
    return {
        "loss": _series(hist, "loss"),
        "learning_rate": _series(hist, "learning_rate"),
        "eval_loss": _series(hist, "eval_loss"),
        "eval_ema_loss": _series(hist, "eval_ema_loss"),
        "grad_norm": _heatmap(run),
        "tokens_per_second": throughput["tokens_per_second"],
        "mfu": throughput["mfu"],
        "anomalies": anomalies,
        "skipped_steps": list(monitor.get("skipped_steps", [])),
        "features": collect_features(hist, run.schedules),
    }


def _final_metrics(run: RunFiles) -> dict[str, Any]:
    final = next((e for e in reversed(run.log_history) if "train_runtime" in e), {})
    out = {"global_step": run.state.get("global_step"), "epoch": run.state.get("epoch")}
    for key in ("train_loss", "train_runtime", "train_samples_per_second",
                "train_steps_per_second"):
        if key in final:
            out[key] = final[key]
    if run.state.get("best_metric") is not None:
        out["best_metric"] = run.state["best_metric"]
    return {k: v for k, v in out.items() if v is not None}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.html`` (PNG plots embedded) and the PNGs beside it; return the HTML path.

    Args:
        run_dir: a ``forge train`` output directory (or any directory with a Trainer state).
        out_dir: where to write; default ``RUN_DIR/report``.

    Returns:
        The path of the HTML page.

    Raises:
        ForgeError: the run directory has no trainer state, or matplotlib is missing.

    Example:
        >>> path = write_report("outputs/demo")  # doctest: +SKIP
    """
    from forge.report.plots import PLOTS, plot_feature, require_matplotlib

    require_matplotlib()
    run = load_run(run_dir)
    series = collect_series(run)
    out = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    sections, notes = [], []
    for name, title, draw in PLOTS:
        png, note = draw(series)
        if note:
            notes.append(f"{title}: {note}")
        if png is None:
            continue
        atomic_write_bytes(out / f"{name}.png", png)
        data = base64.b64encode(png).decode("ascii")
        sections.append(f'<figure id="{name}"><h2>{html.escape(title)}</h2>'
                        f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                        f"</figure>")
    features = series["features"]
    for name, title, how in FEATURES:
        figures = features[name]
        if figures is None:
            notes.append(f"{title}: not in this run (no {PREFIX}{name}/ figures in the log history; {how})")
            continue
        events = features["freeze_events"] if name == "freeze" else []
        png = plot_feature(figures, events)
        if png is not None:
            atomic_write_bytes(out / f"feature_{name}.png", png)
        sections.append(_feature_section(name, title, figures, events, png))
    page = _page(run, series, sections, notes)
    path = out / "report.html"
    atomic_write_text(path, page)
    return path


def _feature_section(name: str, title: str, figures: dict[str, dict[str, list[float]]],
                     events: list[dict[str, Any]], png: bytes | None) -> str:
    """One feature: its plot (figures logged more than once), a table of every figure, and for
    the freeze schedule its changes. Everything from the run's files is escaped."""
    esc = html.escape
    name_id = esc(f"feature-{name}")
    parts = [f'<section id="{name_id}"><h2>{esc(title)}</h2>']
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<img alt="{esc(title)}" src="data:image/png;base64,{data}">')
    rows = "".join(
        f"<tr><td>{esc(PREFIX + name + '/' + key)}</td><td>{esc(_fmt(s['value'][-1]))}</td>"
        f"<td>{esc(str(s['step'][-1]))}</td><td>{esc(_fmt(min(s['value'])))}</td>"
        f"<td>{esc(_fmt(max(s['value'])))}</td><td>{len(s['value'])}</td></tr>"
        for key, s in figures.items())
    parts.append("<table><tr><th>figure</th><th>last</th><th>at step</th><th>min</th><th>max</th>"
                 f"<th>points</th></tr>{rows}</table>")
    if events:
        changes = "".join(
            f"<tr><td>{esc(str(e['step']))}</td><td>{esc(str(e['schedule']))}</td><td>{esc(str(e['period']))}</td>"
            f"<td>{esc(', '.join(str(b) for b in e['blocks']))}</td></tr>" for e in events)
        parts.append("<h3>Schedule changes</h3><table><tr><th>step</th><th>schedule</th><th>period</th>"
                     f"<th>trainable blocks</th></tr>{changes}</table>")
    parts.append("</section>")
    return "".join(parts)


def _page(run: RunFiles, series: dict[str, Any], sections: list[str], notes: list[str]) -> str:
    esc = html.escape
    metrics = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_fmt(v))}</td></tr>"
                      for k, v in _final_metrics(run).items())
    note_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    records = (run.monitor or {}).get("anomalies", [])[:20]
    anomaly_rows = "".join(
        f"<tr><td>{esc(str(r.get('first_step')))}&ndash;{esc(str(r.get('last_step')))}</td>"
        f"<td>{esc(str(r.get('count')))}</td><td>{esc(str(r.get('first_message', '')))}</td></tr>"
        for r in records)
    anomalies = (f"<h2>Anomalies</h2><table><tr><th>steps</th><th>count</th><th>first</th></tr>"
                 f"{anomaly_rows}</table>" if anomaly_rows else "")
    preset = (f"<h2>Preset</h2><pre>{esc(run.preset_yaml)}</pre>" if run.preset_yaml else "")
    # No "<" at all in the script element ("</script>", "<!--" from a run file end or bend it);
    # JSON reads the escape back as "<".
    data = json.dumps(json_safe(series)).replace("<", "\\u003c")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>forge report: {esc(run.run_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ text-align: left; padding: 0.2em 1em 0.2em 0; border-bottom: 1px solid #ddd; }}
img {{ max-width: 100%; }} figure {{ margin: 1.5em 0; }}
pre {{ background: #f6f6f6; padding: 1em; }}
.notes {{ color: #666; }}
</style></head><body>
<h1>forge report: {esc(run.run_dir.name)}</h1>
<p>From {esc(", ".join(run.sources))}{", " + MONITOR_FILE if run.monitor else ""} in
<code>{esc(str(run.run_dir))}</code>.</p>
<table>{metrics}</table>
{"<ul class='notes'>" + note_html + "</ul>" if note_html else ""}
{"".join(sections)}
{anomalies}
{doctor_section(run.run_dir)}
{preset}
<script type="application/json" id="forge-series">{data}</script>
</body></html>
"""


