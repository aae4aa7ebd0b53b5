"""The trainable parameters of a run, with their groups, kept current: the one view that EMA,
the gradient monitor, the freeze schedules and the trackers share.

Features used to snapshot ``requires_grad`` at ``on_train_begin`` each on their own, so a block
that a schedule unfroze later was never averaged nor watched, and which one saw what depended
on callback order. Now:

* the **universe** is every parameter that trains at some point of the run: the ones trainable
  now, plus the ones a schedule *declares* it will switch on. EMA averages the universe from
  the start (a frozen weight does not move, so its average is exact either way);
* the **active** parameters are the ones with ``requires_grad`` now. Whoever changes that (a
  schedule, or a user between steps) calls :meth:`TrainableSet.refresh`, which bumps
  :attr:`TrainableSet.version` and records the change as an event; the monitor compares the
  version once per step (an int) and re-reads the active mask only when it moved;
* the **groups** come from :func:`forge.core.discovery.find_layers`, the one grouper: ``layer_07``
  (``encoder_layer_00`` / ``decoder_layer_00`` on encoder-decoder models), ``embeddings``,
  ``norm``, ``head``, ``vision`` (a multimodal model's vision tower), ``other``;
* a step that the monitor skipped is marked here (:meth:`TrainableSet.skip`), so EMA leaves it
  out too.

There is one set per model: :func:`trainable_set` returns it (made on first use, kept on the
model). Names are relative to the model as the Trainer holds it (PEFT names included).

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> ts = trainable_set(model)
    >>> model[0].weight.requires_grad_(False); ts.refresh(step=3)
    True
    >>> ts.version, "0.weight" in ts.active_names(), "0.weight" in ts.universe
    (1, False, True)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from forge.core.unwrap import strip_wrappers

_ATTR = "_forge_trainable_set"


def group_label(key: str, block_stack: tuple[int, ...] = (), stacks: tuple[str, ...] = (),
                width: int = 2) -> str:
    """Display name of a :class:`~forge.core.discovery.LayerInfo` group key.

    ``block.7`` -> ``layer_07``; on a model with two stacks (encoder-decoder) the stack is named
    and blocks count from 0 in each: ``encoder_layer_00``, ``decoder_layer_03``.

    Example:
        >>> group_label("block.7")
        'layer_07'
    """
    if not key.startswith("block."):
        return key
    i = int(key.split(".")[1])
    if len(stacks) > 1 and block_stack:
        stack = block_stack[i]
        first = block_stack.index(stack)
        name = stacks[stack].rsplit(".", 2)
        side = next((s for s in ("encoder", "decoder") if s in stacks[stack]), name[-1])
        return f"{side}_layer_{i - first:0{width}d}"
    return f"layer_{i:0{width}d}"


class TrainableSet:
    """The parameters of one model that train, their groups, and every change to them.

    Args:
        model: the model as it will train (plain or PEFT; DDP/compile wrappers are seen through).

    Attributes:
        version: bumped by every :meth:`refresh` that found a change.
        events: one dict per change: ``step``, ``trainable_params``, ``trainable_tensors``,
            ``blocks`` (indices of blocks with a trainable parameter) and ``reason``.
    """

    def __init__(self, model: nn.Module) -> None:
        model = strip_wrappers(model)
        self._model = weakref.ref(model)
        self._params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self.info: Any = None  # the LayerInfo, when the model has repeated blocks
        self._group_of = self._groups(model)
        self._declared: set[str] = set()
        self._active = frozenset(n for n, p in self._params.items() if p.requires_grad)
        self.version = 0
        self.events: list[dict[str, Any]] = []
        self._skipped: set[int] = set()
        self._listeners: list[Callable[[TrainableSet, int], None]] = []

    # -- what the groups are ----------------------------------------------------------------
    def _groups(self, model: nn.Module) -> dict[str, str]:
        from forge.core.discovery import find_layers

        try:
            info = find_layers(model)
        except ValueError:  # no repeated blocks (a plain nn.Module): everything is "other"
            return dict.fromkeys(self._params, "other")
        self.info = info
        width = max(2, len(str(max(info.num_blocks - 1, 0))))
        out = {}
        for key, names in info.groups.items():
            label = group_label(key, info.block_stack, info.stacks, width)
            out.update(dict.fromkeys(names, label))
        for name in self._params:
            out.setdefault(name, "other")
        return out

    def group_of(self, name: str) -> str:
        """The group of a parameter: ``layer_07``, ``embeddings``, ``norm``, ``head``, ``other``..."""
        return self._group_of.get(name, "other")

    # -- which parameters ---------------------------------------------------------------------
    @property
    def universe(self) -> list[str]:
        """Every parameter that trains at some point: trainable now or declared by a schedule,
        in ``named_parameters`` order."""
        return [n for n, p in self._params.items() if p.requires_grad or n in self._declared]

    def declare(self, names: Iterable[str]) -> None:
        """Add parameters a schedule will switch on later (call before training starts)."""
        self._declared.update(names)

    def parameters(self, names: Iterable[str] | None = None) -> list[nn.Parameter]:
        """The parameter objects for ``names`` (default: the universe)."""
        return [self._params[n] for n in (self.universe if names is None else names)]

    def active_names(self) -> list[str]:
        """The parameters that have ``requires_grad`` (as of the last refresh)."""
        return [n for n in self._params if n in self._active]

    def refresh(self, step: int = 0, reason: str = "") -> bool:
        """Re-read ``requires_grad``; on a change bump :attr:`version`, log an event and tell
        the listeners. Returns whether anything changed."""
        now = frozenset(n for n, p in self._params.items() if p.requires_grad)
        if now == self._active:
            return False
        self._active = now
        self.version += 1
        blocks = sorted({int(g.rsplit("_", 1)[1]) for n in now
                         if (g := self.group_of(n)).startswith(("layer_", "encoder_layer_", "decoder_layer_"))})
        self.events.append({"step": int(step), "trainable_params": int(sum(self._params[n].numel() for n in now)),
                            "trainable_tensors": len(now), "blocks": blocks, "reason": reason})
        for listener in list(self._listeners):
            listener(self, step)
        return True

    def subscribe(self, listener: Callable[[TrainableSet, int], None]) -> None:
        """Call ``listener(self, step)`` after every change."""
        self._listeners.append(listener)

    def numel(self, active_only: bool = True) -> int:
        """Parameters (elements) trainable now, or in the whole universe."""
        names = self.active_names() if active_only else self.universe
        return int(sum(self._params[n].numel() for n in names))

    # -- skipped steps ---------------------------------------------------------------------------
    def skip(self, step: int) -> None:
        """Mark optimizer step ``step`` as not applied (the monitor held its update back)."""
        self._skipped.add(int(step))

    def was_skipped(self, step: int) -> bool:
        """Whether the update of optimizer step ``step`` was held back."""
        return int(step) in self._skipped

    def state_dict(self) -> dict[str, Any]:
        """JSON: the events and the skipped steps (for checkpoints and reports)."""
        return {"events": list(self.events), "skipped": sorted(self._skipped), "version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = [dict(e) for e in state.get("events", [])]
        self._skipped = {int(s) for s in state.get("skipped", [])}


def trainable_set(model: nn.Module) -> TrainableSet:
    """The one :class:`TrainableSet` of ``model`` (made on first use and kept on the model).

    Example:
        >>> ts = trainable_set(model)  # EMA, the monitor and a schedule all get this same object
    """
    target = strip_wrappers(model)
    found = getattr(target, _ATTR, None)
    if isinstance(found, TrainableSet) and found._model() is target:
        return found
    made = TrainableSet(target)
    # Set through __dict__: nn.Module.__setattr__ would try to register a module or buffer.
    object.__setattr__(target, _ATTR, made)
    return made


def skip_flag(model: nn.Module, step: int) -> bool:
    """Whether the monitor skipped optimizer step ``step`` of ``model`` (False if nobody asked)."""
    target = strip_wrappers(model)
    found = getattr(target, _ATTR, None)
    return isinstance(found, TrainableSet) and found.was_skipped(step)
