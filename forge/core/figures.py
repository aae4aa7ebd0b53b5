"""How forge figures reach every tracker: each forge callback adds its ``forge/...`` values to
the ``logs`` dict of ``on_log``, running ahead of the tracker integrations, and to the entry the
Trainer just stored in ``state.log_history`` (which ``trainer_state.json`` and ``forge report``
read).

The Trainer adds user callbacks after the ``report_to`` integrations, which would receive
``logs`` before a forge callback filled it in; :func:`put_ahead_of_trackers` reorders once, at
``on_train_begin``.
"""

from __future__ import annotations

from typing import Any

PREFIX = "forge/"  # every forge figure sits under forge/ in the logs and the trackers
_PRINTERS = {"ProgressCallback", "PrinterCallback", "NotebookProgressCallback"}


def is_forge_callback(callback: Any) -> bool:
    """Whether a callback is one of forge's (they all live in the ``forge`` package)."""
    return type(callback).__module__.split(".")[0] == "forge"


def put_ahead_of_trackers(handler: Any, callback: Any) -> None:
    """Reorder ``handler.callbacks``: flow control, console printers, forge callbacks, the rest.

    The console printers go before the forge callbacks, so the progress line keeps its usual
    short form; the trackers (and forge's own tracker callbacks) get every figure. Forge's
    feature callbacks keep their relative order. The list is replaced, not edited, because the
    handler may be iterating over it right now.
    """
    others = [cb for cb in handler.callbacks if cb is not callback]
    flow = [cb for cb in others if type(cb).__name__ == "DefaultFlowCallback"]
    printers = [cb for cb in others if type(cb).__name__ in _PRINTERS]
    # A callback that must see every other one's on_save first (the checkpoint completion
    # marker) stays at the very end.
    last = [cb for cb in others if getattr(cb, "runs_last", False)]
    placed = flow + printers
    forge = [cb for cb in others if is_forge_callback(cb) and not _is_tracker(cb)
             and cb not in placed and cb not in last]
    rest = [cb for cb in others if not any(cb is x for x in placed + forge + last)]
    handler.callbacks = placed + forge + [callback] + rest + last


def _is_tracker(callback: Any) -> bool:
    return type(callback).__module__.startswith("forge.trackers")


def add_figures(logs: dict[str, Any] | None, state: Any, figures: dict[str, float],
                history: dict[str, float] | None = None) -> None:
    """Put ``figures`` into the ``logs`` of this ``on_log`` and ``history`` (default: the same
    figures) into the Trainer's copy of it in ``state.log_history``."""
    if logs is None or not figures:
        return
    logs.update(figures)
    entries = state.log_history
    trainers_own = {k for k in logs if not k.startswith(PREFIX)}
    if entries and entries[-1].get("step") == state.global_step and trainers_own <= entries[-1].keys():
        # Trainer.log stored a copy of ``logs`` (without forge's figures) before the callbacks ran.
        entries[-1].update(figures if history is None else history)


def is_eval_log(logs: dict[str, Any] | None) -> bool:
    """An evaluation's ``on_log`` (its keys start with ``eval_``): forge's training figures wait."""
    return bool(logs) and any(k.startswith("eval_") for k in logs)
