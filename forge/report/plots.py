"""The PNG plots of :mod:`forge.report`, drawn with matplotlib's object API.

Each plot takes the series dict of :func:`forge.report.collect_series` and returns
``(png bytes or None, note or None)``: a series the run did not record gives a note, never an
error. ``matplotlib.figure.Figure`` is used without pyplot, so no global backend is switched
in the caller's process (a notebook keeps its own).
"""

from __future__ import annotations

import importlib.util
import io
import math
from typing import Any, Callable

from forge.errors import ForgeError

KIND_COLORS = {"nonfinite": "#d62728", "spike": "#ff7f0e", "explode": "#9467bd",
               "vanish": "#1f77b4", "dead": "#7f7f7f"}
_SIZE = (8.0, 3.6)


def require_matplotlib() -> None:
    """Raise a one-line :class:`ForgeError` naming the extra when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ForgeError('forge report needs matplotlib: pip install "transformers-forge[report]"')


def _figure() -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _mark_anomalies(ax: Any, series: dict[str, Any]) -> None:
    """Vertical lines at anomaly steps (one legend entry per kind), crosses at skipped steps."""
    seen = set()
    for event in series["anomalies"]:
        kind = event.get("kind") or "other"
        ax.axvline(event["step"], color=KIND_COLORS.get(kind, "#000000"), alpha=0.45, lw=1,
                   ls="--", label=None if kind in seen else f"anomaly: {kind}")
        seen.add(kind)
    skipped = series["skipped_steps"]
    if skipped:
        ax.plot(skipped, [0.98] * len(skipped), "x", color="#d62728", ms=7,
                transform=ax.get_xaxis_transform(), label="skipped step")


def plot_loss_lr(series: dict[str, Any]) -> tuple[bytes | None, str | None]:
    """Training loss (and evaluation loss) with the learning rate on a second axis."""
    loss, lr, ev = series["loss"], series["learning_rate"], series["eval_loss"]
    if loss is None and lr is None:
        return None, "no training loss or learning rate in the log history"
    fig, ax = _figure()
    if loss is not None:
        ax.plot(loss["step"], loss["value"], color="#1f77b4", lw=1.6, label="training loss")
    if ev is not None:
        ax.plot(ev["step"], ev["value"], "o-", color="#2ca02c", ms=4, lw=1, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    _mark_anomalies(ax, series)
    handles, labels = ax.get_legend_handles_labels()
    if lr is not None:
        ax2 = ax.twinx()
        ax2.plot(lr["step"], lr["value"], color="#7f7f7f", lw=1.2, ls=":", label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    note = None if lr is not None and loss is not None else (
        "no learning rate logged" if lr is None else "no training loss logged")
    return _png(fig), note


def plot_grad_norm_heatmap(series: dict[str, Any]) -> tuple[bytes | None, str | None]:
    """log10 of each block's gradient norm at each logging step; anomalies marked."""
    data = series["grad_norm"]
    if data is None:
        return None, ("no per-block gradient norms (turn on the gradient monitor: "
                      "monitor.enabled: true)")
    import numpy as np

    values = np.array([[math.log10(v) if v and v > 0 else np.nan for v in row]
                       for row in data["values"]], dtype=float)
    steps, blocks = data["steps"], data["blocks"]
    fig, ax = _figure()
    fig.set_figheight(max(2.6, 0.8 + 0.28 * len(blocks)))
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis",
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, label="log10 gradient norm", pad=0.01)
    ax.set_yticks(range(len(blocks)), blocks, fontsize=7 if len(blocks) > 16 else 8)
    ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_xlabel("step")
    # An anomaly at step s is drawn on the first logging column at or after s.
    seen = set()
    for event in series["anomalies"]:
        col = next((i for i, s in enumerate(steps) if s >= event["step"]), len(steps) - 1)
        kind = event.get("kind") or "other"
        color = KIND_COLORS.get(kind, "#ffffff")
        label = None if kind in seen else f"anomaly: {kind}"
        seen.add(kind)
        if event.get("where") in blocks:
            ax.plot(col, blocks.index(event["where"]), "o", mfc="none", mec=color, mew=2,
                    ms=9, label=label)
        else:  # the loss, or every block at once
            ax.axvline(col, color=color, lw=1.5, ls="--", label=label)
    if seen:
        ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    return _png(fig), None


def plot_eval_ema(series: dict[str, Any]) -> tuple[bytes | None, str | None]:
    """Evaluation loss of the trained weights and of their EMA."""
    raw, ema = series["eval_loss"], series["eval_ema_loss"]
    if raw is None and ema is None:
        return None, "no evaluation loss (give an eval set, e.g. data.eval_fraction: 0.1)"
    fig, ax = _figure()
    if raw is not None:
        ax.plot(raw["step"], raw["value"], "o-", color="#1f77b4", ms=4, label="eval loss (raw)")
    if ema is not None:
        ax.plot(ema["step"], ema["value"], "s-", color="#d62728", ms=4, label="eval loss (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    note = None if ema is not None else (
        "no EMA evaluation (ema: {enabled: true, eval_with_ema: true})")
    return _png(fig), note


def plot_throughput(series: dict[str, Any]) -> tuple[bytes | None, str | None]:
    """Training tokens per second (and model FLOPs utilisation when known)."""
    tps, mfu = series["tokens_per_second"], series["mfu"]
    if tps is None:
        return None, ("no throughput series (the gradient monitor logs tokens/s: "
                      "monitor.enabled: true)")
    fig, ax = _figure()
    ax.plot(tps["step"], tps["value"], color="#2ca02c", lw=1.6, label="tokens/s")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if mfu is not None:
        ax2 = ax.twinx()
        ax2.plot(mfu["step"], [100 * v for v in mfu["value"]], color="#9467bd", lw=1, ls="--",
                 label="MFU %")
        ax2.set_ylabel("MFU (%)")
        ax2.set_ylim(bottom=0)
    return _png(fig), None


def plot_feature(figures: dict[str, dict[str, list[float]]], events: list[dict[str, Any]] = ()) -> bytes | None:
    """One feature's figures over steps, one small panel each (their scales differ: a decay near
    1, a distance near 0, a count); schedule changes as vertical lines. None when no figure has
    more than one point (those are the table's)."""
    series = {name: s for name, s in figures.items() if len(s["step"]) > 1}
    if not series:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(_SIZE[0], 1.1 + 1.5 * len(series)), dpi=100, layout="constrained")
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, s) in zip(axes, series.items()):
        ax.plot(s["step"], s["value"], ".-", color="#1f77b4", lw=1.4, ms=4)
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
        for i, event in enumerate(events):
            ax.axvline(event["step"], color="#ff7f0e", alpha=0.6, lw=1, ls="--",
                       label="schedule change" if i == 0 else None)
    if events:
        axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("step")
    return _png(fig)


PLOTS: list[tuple[str, str, Callable[[dict[str, Any]], tuple[bytes | None, str | None]]]] = [
    ("loss_lr", "Loss and learning rate", plot_loss_lr),
    ("grad_norm_heatmap", "Gradient norm per block", plot_grad_norm_heatmap),
    ("eval_ema", "Evaluation loss: EMA vs raw weights", plot_eval_ema),
    ("throughput", "Throughput", plot_throughput),
]
