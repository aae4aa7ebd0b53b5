"""``forge report RUN_DIR``: one self-contained HTML page about a finished run, no tracker needed.

It reads only the run's own files: ``trainer_state.json`` (which ``forge train`` writes into the
output directory) and ``checkpoint-*/trainer_state.json``, ``monitor_summary.json`` (from the
gradient monitor) and ``forge_preset.yaml`` when present, and plots loss and learning rate,
per-block gradient norms as a heat map over steps with anomalies marked, EMA against raw
evaluation loss, and throughput. A series the run did not record is skipped with a note.

    python -m forge.report outputs/demo          # writes outputs/demo/report/report.html

Example:
    >>> from forge.report import write_report
    >>> write_report("outputs/demo")  # doctest: +SKIP
    PosixPath('outputs/demo/report/report.html')
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge.errors import ForgeError

STATE_FILE = "trainer_state.json"
MONITOR_FILE = "monitor_summary.json"
PRESET_FILE = "forge_preset.yaml"
# Forge figures are logged under forge/ (the monitor's per-block norms among them).
PREFIXES = ("forge/",)
_NORM_KEY = re.compile(r"^forge/grad_norm/(.+)$")


@dataclass
class RunFiles:
    """What a run directory holds, read once.

    Attributes:
        run_dir: the directory.
        log_history: the Trainer's log entries, merged over the final state and checkpoints.
        sources: the files ``log_history`` came from.
        monitor: the gradient monitor's summary, or None.
        preset_yaml: the resolved preset (secrets redacted), or None.
        state: the newest ``trainer_state.json`` minus its log history.
    """

    run_dir: Path
    log_history: list[dict[str, Any]]
    sources: list[str]
    monitor: dict[str, Any] | None = None
    preset_yaml: str | None = None
    state: dict[str, Any] = field(default_factory=dict)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ForgeError(f"cannot read '{path}': {err}") from None


def load_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory: merged log history, monitor summary and preset.

    Checkpoint states come first (oldest step first) and the final ``trainer_state.json``
    last; an entry logged again later (same step, same keys, e.g. after a resume) replaces the
    earlier one, so a crashed run without a final state still has its checkpoints' history.

    Raises:
        ForgeError: no such directory, or no trainer state in it.

    Example:
        >>> load_run("outputs/demo").log_history[0]["loss"]  # doctest: +SKIP
        6.02
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ForgeError(f"run directory '{run_dir}' not found")

    def ckpt_step(path: Path) -> int:
        tail = path.parent.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    paths = sorted(root.glob(f"checkpoint-*/{STATE_FILE}"), key=ckpt_step)
    if (root / STATE_FILE).is_file():
        paths.append(root / STATE_FILE)
    if not paths:
        raise ForgeError(f"'{run_dir}' has no {STATE_FILE} (nor checkpoint-*/{STATE_FILE}); "
                         "is it the output directory of `forge train`?")
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    state: dict[str, Any] = {}
    for path in paths:
        data = _read_json(path)
        for entry in data.get("log_history", []):
            merged[(entry.get("step"), tuple(sorted(entry)))] = entry
        state = {k: v for k, v in data.items() if k != "log_history"}
    history = sorted(merged.values(), key=lambda e: e.get("step") or 0)  # stable within a step
    monitor = _read_json(root / MONITOR_FILE) if (root / MONITOR_FILE).is_file() else None
    preset = None
    if (root / PRESET_FILE).is_file():
        from forge._trackers_redact import redact_yaml

        preset = redact_yaml((root / PRESET_FILE).read_text(encoding="utf-8"))
    sources = [str(p.relative_to(root)) for p in paths]
    return RunFiles(root, history, sources, monitor, preset, state)


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


def _block_order(name: str) -> tuple[int, str]:
    return (0 if name == "embeddings" else 2 if name == "head" else 3 if name == "other" else 1,
            name)


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
                v = next((r[p + "grad_norm/" + block] for p in PREFIXES
                          if p + "grad_norm/" + block in r), None)
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
        keys = [p + name for p in PREFIXES]
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
    from forge._report_plots import PLOTS, require_matplotlib

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
        (out / f"{name}.png").write_bytes(png)
        data = base64.b64encode(png).decode("ascii")
        sections.append(f'<figure id="{name}"><h2>{html.escape(title)}</h2>'
                        f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                        f"</figure>")
    page = _page(run, series, sections, notes)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _page(run: RunFiles, series: dict[str, Any], sections: list[str], notes: list[str]) -> str:
    esc = html.escape
    metrics = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_fmt(v))}</td></tr>"
                      for k, v in _final_metrics(run).items())
    note_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    records = (run.monitor or {}).get("anomalies", [])[:20]
    anomaly_rows = "".join(
        f"<tr><td>{r.get('first_step')}&ndash;{r.get('last_step')}</td><td>{r.get('count')}</td>"
        f"<td>{esc(str(r.get('first_message', '')))}</td></tr>" for r in records)
    anomalies = (f"<h2>Anomalies</h2><table><tr><th>steps</th><th>count</th><th>first</th></tr>"
                 f"{anomaly_rows}</table>" if anomaly_rows else "")
    preset = (f"<h2>Preset</h2><pre>{esc(run.preset_yaml)}</pre>" if run.preset_yaml else "")
    # "</" cannot end the script element early: JSON allows escaping the slash.
    data = json.dumps(_json_safe(series)).replace("</", "<\\/")
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
{preset}
<script type="application/json" id="forge-series">{data}</script>
</body></html>
"""


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    """``python -m forge.report RUN_DIR [--out DIR]``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="forge report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="output directory of a finished (or stopped) run")
    parser.add_argument("--out", help="where to write the report (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir, args.out)
    except ForgeError as err:
        print(f"forge: error: {err}", file=sys.stderr)
        return 2
    print(f"forge: report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
