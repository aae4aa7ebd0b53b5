"""Glue between :class:`forge.monitor.GradientMonitor` and a running ``transformers.Trainer``.

The Trainer hands its callbacks the model, optimizer and scheduler but not itself. The monitor
needs two more things from it: the clip step (gradients are only visible unclipped just
before it) and the on-device loss accumulator (:mod:`forge.core.figures` puts it ahead of the
trackers). It finds the Trainer that
is calling it once per ``train()``, and every change it makes here is undone at the end.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable
from typing import Any


class Patches:
    """Instance-attribute overrides that can all be undone, newest first.

    Example:
        >>> class A:
        ...     def f(self): return 1
        >>> a, patches = A(), Patches()
        >>> patches.set(a, "f", lambda: 2); a.f()
        2
        >>> patches.undo(); a.f()
        1
    """

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, bool, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        had = name in vars(obj)
        self._undo.append((obj, name, had, vars(obj).get(name)))
        setattr(obj, name, value)

    def undo(self) -> None:
        while self._undo:
            obj, name, had, old = self._undo.pop()
            if had:
                setattr(obj, name, old)
            else:
                vars(obj).pop(name, None)


def patch_skippable_step(patches: Patches, optimizer: Any, should_skip: Callable[[], bool]) -> None:
    """Make ``optimizer.step()`` a no-op while ``should_skip()`` is true.

    Not calling the step at all is the only way to leave both the weights and the optimizer
    state untouched: with zeroed gradients Adam would still move the weights on its momentum
    and advance its step count. The replacement is a bound method that keeps the marker the
    LR scheduler puts on ``step``, so torch's "step called in the wrong order" check still holds.
    """
    original = optimizer.step

    def step(_self: Any, *args: Any, **kwargs: Any) -> Any:
        if should_skip():
            return None
        return original(*args, **kwargs)

    if getattr(original, "_wrapped_by_lr_sched", False):
        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    patches.set(optimizer, "step", types.MethodType(step, optimizer))


def scheduler_backup(lr_scheduler: Any, optimizer: Any) -> tuple[Any, list[float]] | None:
    """What is needed to undo one ``lr_scheduler.step()`` after a skipped optimizer step."""
    if lr_scheduler is None or not hasattr(lr_scheduler, "state_dict"):
        return None
    return copy.deepcopy(lr_scheduler.state_dict()), [g["lr"] for g in optimizer.param_groups]


def scheduler_restore(backup: tuple[Any, list[float]] | None, lr_scheduler: Any,
                      optimizer: Any) -> None:
    """Put the scheduler and the learning rates back as :func:`scheduler_backup` saw them."""
    if backup is None:
        return
    state, lrs = backup
    lr_scheduler.load_state_dict(state)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def will_log(args: Any, state: Any, step: int, log_every: int | None) -> bool:
    """Whether the Trainer will log at optimizer step ``step`` (known before the step)."""
    if log_every and step % log_every == 0:
        return True
    if str(getattr(args.logging_strategy, "value", args.logging_strategy)) == "steps":
        every = getattr(state, "logging_steps", None) or args.logging_steps
        if every and step % every == 0:
            return True
    if step == 1 and args.logging_first_step:
        return True
    return bool(state.max_steps) and step >= state.max_steps


def opens_detail_window(step: int, every: int, detail_every: int) -> bool:
    """Whether a logging step (one every ``every`` steps) is the first in its window of
    ``detail_every`` steps (1-10, 11-20, ... for 10); always true when ``detail_every <= every``."""
    return (step - 1) // detail_every != (step - 1 - every) // detail_every


def measures_details(args: Any, state: Any, step: int, log_every: int | None, detail_every: int) -> bool:
    """Whether step ``step`` measures update ratios and zero fractions: a logging step that is
    the first one in its window of ``detail_every`` steps (1-10, 11-20, ... for 10), and the
    last step.

    A pure function of the step and the arguments, so a resumed run measures on the same steps
    as an uninterrupted one.
    """
    if not will_log(args, state, step, log_every):
        return False
    # The logging interval in steps (the Trainer turns a fractional logging_steps into steps).
    every = max(1, int(log_every or getattr(state, "logging_steps", None) or args.logging_steps or 1))
    last = bool(state.max_steps) and step >= state.max_steps  # the final log measures, too
    return last or opens_detail_window(step, every, max(1, detail_every))


def loss_scaler(optimizer: Any) -> Any | None:
    """The fp16 ``GradScaler`` Accelerate attached to the optimizer, when it is enabled."""
    scaler = getattr(optimizer, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def grads_still_scaled(scaler: Any, optimizer: Any) -> bool:
    """Whether the gradients of ``optimizer`` still carry the fp16 loss scale.

    The Trainer unscales them in place whenever it measures their norm (with clipping, and
    with ``max_grad_norm: 0`` too, through ``clip_grad_norm_(..., inf)``); GradScaler records
    that per optimizer, so the monitor divides by the scale only when nobody did yet.
    """
    try:
        from torch.amp.grad_scaler import OptState
    except ImportError:  # torch < 2.3
        from torch.cuda.amp.grad_scaler import OptState  # type: ignore[no-redef]
    inner = getattr(optimizer, "optimizer", optimizer)
    states = getattr(scaler, "_per_optimizer_states", None)
    state = states.get(id(inner)) if isinstance(states, dict) else None  # .get: no default entry
    return not (state is not None and state.get("stage") is OptState.UNSCALED)


def track_deepspeed_loss(patches: Patches, engine: Any) -> dict[str, Any]:
    """Keep the loss of the newest ``engine.backward`` call under ``"loss"``: DeepSpeed steps
    inside the last micro-batch's backward, before the Trainer adds that loss to its total."""
    seen: dict[str, Any] = {"loss": None}
    original = engine.backward

    def backward(loss: Any, *args: Any, **kwargs: Any) -> Any:
        seen["loss"] = loss.detach() if hasattr(loss, "detach") else None
        return original(loss, *args, **kwargs)

    patches.set(engine, "backward", backward)
    return seen
