"""Private base for the trainability schedules in :mod:`forge.layers.schedules`.

How a schedule keeps the optimizer right while parameters change trainability:

* When bound to the model (constructor or ``on_init_end``) it switches every parameter it will
  ever train to ``requires_grad=True``, so the optimizer the Trainer builds in ``train()`` holds
  all of them; ``on_train_begin`` (which runs after the optimizer exists and after a checkpoint's
  optimizer state is loaded) then applies the schedule for the current step.
* A parameter that is frozen gets ``grad = None``. Every torch optimizer skips such parameters
  entirely: no update, no weight decay, no moment update.
* Optionally the optimizer state of a parameter is dropped when it is frozen, so a block that
  comes back (LISA) starts with fresh moments instead of stale ones, and the memory is freed.
* Trainability is a pure function of (global step, epoch, config), so resuming from a
  checkpoint reproduces the uninterrupted run; the JSON written next to each checkpoint lets a
  resume check that the configuration did not change.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from forge.core.discovery import LayerInfo, find_layers
from forge.core.figures import add_figures, is_eval_log, put_ahead_of_trackers
from forge.core.io import write_json
from forge.core.paths import checkpoint_dir
from forge.core.trainable import trainable_set
from forge.core.trainer_lookup import find_trainer_on_stack
from forge.layers.freeze import set_trainable_

logger = logging.getLogger(__name__)


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` (or None)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class TrainabilitySchedule(TrainerCallback):
    """Base: subclasses define ``_managed_extra`` and ``_active(period)``; this class does the rest."""

    kind = "schedule"

    def __init__(
        self,
        model: nn.Module | None,
        every_n_steps: int | None,
        every_n_epochs: int | None,
        reset_optimizer_state: bool,
    ) -> None:
        if (every_n_steps is None) == (every_n_epochs is None):
            raise ValueError(f"{type(self).__name__}: set exactly one of every_n_steps / every_n_epochs")
        for label, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"{type(self).__name__}: {label} must be >= 1, got {value}")
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.reset_optimizer_state = reset_optimizer_state
        self.history: list[dict[str, Any]] = []  # one entry per change: step, period, trainable blocks
        self._model: nn.Module | None = None
        self._info: LayerInfo | None = None
        self._managed: list[str] = []
        self._period: int | None = None
        if model is not None:
            self.bind(model)

    # -- subclass hooks -------------------------------------------------------------------
    def _managed_extra(self, model: nn.Module, info: LayerInfo) -> list[str]:
        """Names to train at some point beyond those trainable at bind time."""
        return []

    def _active(self, period: int) -> set[str]:
        """Managed parameter names trainable during ``period``."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Everything that determines the schedule (checked on resume)."""
        return {"every_n_steps": self.every_n_steps, "every_n_epochs": self.every_n_epochs}

    # -- binding ----------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> None:
        """Record the parameters this schedule manages and make them all trainable for now.

        Call before the Trainer builds its optimizer (any time before ``trainer.train()``), so
        the optimizer holds every parameter that will ever train.
        """
        info = find_layers(model)
        now = [n for n, p in model.named_parameters() if p.requires_grad]
        managed = list(dict.fromkeys(now + self._managed_extra(model, info)))
        if not managed:
            raise ValueError(f"{type(self).__name__}: the model has no trainable parameters to schedule")
        self._model, self._info, self._managed = model, info, managed
        self._names_to_block = {
            n: int(k.split(".")[1]) for k, v in info.groups.items() if k.startswith("block.") for n in v
        }
        self._prepare()
        params = dict(model.named_parameters())
        set_trainable_((params[n] for n in managed), True)
        # Everything this schedule will ever train is in the run's trainable universe from
        # now on, so EMA averages and the monitor watches a block before it is unfrozen.
        trainable_set(model).declare(managed)

    def _prepare(self) -> None:
        """Precompute per-period sets once the model is bound."""

    @property
    def managed(self) -> list[str]:
        """Names of the parameters this schedule switches on and off."""
        return list(self._managed)

    def period_of(self, global_step: int, epoch: float | None) -> int:
        """Which schedule period a step falls into."""
        if self.every_n_steps is not None:
            return global_step // self.every_n_steps
        # state.epoch is exact at epoch boundaries; the epsilon guards float noise mid-epoch.
        return math.floor((epoch or 0.0) + 1e-6) // self.every_n_epochs

    def trainable_at(self, global_step: int, epoch: float | None = None) -> list[str]:
        """Managed parameter names trainable at a step (pure function; for tests and planning)."""
        active = self._active(self.period_of(global_step, epoch))
        return [n for n in self._managed if n in active]

    # -- applying -----------------------------------------------------------------------------
    def _apply(self, state: Any, optimizer: Any) -> None:
        period = self.period_of(state.global_step, state.epoch)
        if period == self._period:
            return
        active = self._active(period)
        params = dict(self._model.named_parameters())
        off = [params[n] for n in self._managed if n not in active]
        set_trainable_(off, False)
        set_trainable_((params[n] for n in self._managed if n in active), True)
        opt = unwrap_optimizer(optimizer)
        if self.reset_optimizer_state and opt is not None:
            for p in off:
                opt.state.pop(p, None)
        self._period = period
        # Announce it: the monitor and the trackers follow within this same step.
        trainable_set(self._model).refresh(step=int(state.global_step), reason=f"{self.kind} period {period}")
        blocks = sorted({self._names_to_block[n] for n in active if n in self._names_to_block})
        if not self.history or self.history[-1]["period"] != period:
            self.history.append({"step": int(state.global_step), "period": period, "blocks": blocks})

    def _check_optimizer(self, optimizer: Any) -> None:
        opt = unwrap_optimizer(optimizer)
        if opt is None:
            return
        held = {id(p) for group in opt.param_groups for p in group["params"]}
        params = dict(self._model.named_parameters())
        missing = [n for n in self._managed if id(params[n]) not in held]
        if missing:
            raise RuntimeError(
                f"{type(self).__name__}: {len(missing)} scheduled parameters are not in the optimizer "
                f"(e.g. {missing[0]}); create the callback (or freeze) before trainer.train() builds "
                "the optimizer, and do not freeze scheduled parameters afterwards."
            )

    # -- TrainerCallback ------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if self._model is None and model is not None:
            self.bind(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        trainer, _ = find_trainer_on_stack()
        if trainer is not None:
            put_ahead_of_trackers(trainer.callback_handler, self)
        if self._model is None:
            if model is None:
                raise RuntimeError(f"{type(self).__name__}: no model to schedule")
            self.bind(model)
        if model is not None:
            ids = {id(p) for p in model.parameters()}
            if id(self._model.get_parameter(self._managed[0])) not in ids:
                raise RuntimeError(f"{type(self).__name__} was bound to a different model than the Trainer's")
        self._check_optimizer(optimizer)
        if state.global_step > 0:
            self._restore(args, state)
        self._period = None  # force re-application after a resume or a second train() call
        self._apply(state, optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._model is None or is_eval_log(logs):
            return
        ts = trainable_set(self._model)
        blocks = {n for n in ts.active_names() if n in self._names_to_block}
        add_figures(logs, state, {
            "forge/freeze/trainable_params": float(ts.numel()),
            "forge/freeze/trainable_blocks": float(len({self._names_to_block[n] for n in blocks})),
            "forge/freeze/period": float(self._period if self._period is not None else 0),
            "forge/freeze/changes": float(len(self.history)),
        })

    def on_epoch_begin(self, args, state, control, optimizer=None, **kwargs):
        self._apply(state, optimizer)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._apply(state, optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        # The schedule's changes beside the run's trainer_state.json, for `forge report`.
        if self._model is not None and args.should_save and args.output_dir:
            write_json(self.state_dict(), os.path.join(args.output_dir, self.filename))

    def on_save(self, args, state, control, **kwargs):
        folder = checkpoint_dir(args, state.global_step)
        if os.path.isdir(folder) and args.should_save:
            write_json(self.state_dict(), os.path.join(folder, self.filename))

    # -- state ------------------------------------------------------------------------------------
    @property
    def filename(self) -> str:
        """Name of the JSON file written into each checkpoint folder."""
        return f"forge_{self.kind}.json"

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: config, current period and the history of changes."""
        return {"kind": self.kind, "config": self.config(), "period": self._period, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore history; refuse a checkpoint written by a differently configured schedule.

        Raises:
            ValueError: kind or config differ (the resumed run could not equal the original).
        """
        if state.get("kind") != self.kind or state.get("config") != json.loads(json.dumps(self.config())):
            raise ValueError(
                f"{type(self).__name__}: checkpoint schedule {state.get('kind')} {state.get('config')} "
                f"differs from this one {self.config()}; resuming would not reproduce the run"
            )
        self.history = list(state.get("history", []))
        self._period = state.get("period")

    def _restore(self, args: Any, state: Any) -> None:
        folders = [getattr(args, "resume_from_checkpoint", None)]
        folders.append(checkpoint_dir(args, state.global_step))
        for folder in folders:
            path = os.path.join(folder, self.filename) if isinstance(folder, str) else None
            if path and os.path.isfile(path):
                with open(path) as f:
                    self.load_state_dict(json.load(f))
                return
        logger.info("%s: no %s found; recomputing the schedule from the step", type(self).__name__, self.filename)
