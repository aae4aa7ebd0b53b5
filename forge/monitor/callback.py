"""The gradient monitor as a ``TrainerCallback`` (and a plain-loop API): :class:`GradientMonitor`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from forge.core.console import note
from forge.core.distributed import before_deepspeed_step, deepspeed_engine, deepspeed_grad_scaling
from forge.core.figures import add_figures, is_eval_log, put_ahead_of_trackers
from forge.core.io import write_json
from forge.core.paths import checkpoint_dir
from forge.core.trainer_lookup import find_trainer_on_stack
from forge.monitor import trainer as glue
from forge.monitor.config import MonitorConfig
from forge.monitor.core import MonitorCore
from forge.monitor.detect import KINDS, GradientAnomalyError
from forge.monitor.stats import (
    ParamPlan,
    count_tokens,
    default_peak_flops,
    flops_per_token,
)
from forge.monitor.summary import format_summary

__all__ = ["GradientMonitor", "from_preset"]

logger = logging.getLogger("forge.monitor")
STATE_FILE = "gradient_monitor.json"  # written into each Trainer checkpoint directory


class GradientMonitor(TrainerCallback):
    """Per-block gradient health in your trackers, and bad optimizer steps stopped in time.

    Per block (``layer_07``, ``embeddings``, ``head``, ``other``) it reports gradient norm,
    fraction of exactly-zero gradients, weight norm and update/weight ratio; globally the
    pre- and post-clip gradient norm, loss, tokens/s, MFU and accelerator memory. Everything
    is computed on device with fused ``torch._foreach_*`` kernels and copied to the host once
    per logging interval, or once per step (one small row) while a ``skip``/``stop`` policy is
    active, since that decision must precede the optimizer step.

    Create it before the Trainer and pass it in ``callbacks``. It reads gradients just before
    the Trainer clips them; skips a step by not calling ``optimizer.step()`` (weights and
    optimizer state stay bit-identical) and undoing that step's ``lr_scheduler.step()`` (the
    schedule counts applied updates, as for fp16 overflow steps); keeps its history in each
    checkpoint; and writes ``output_dir/monitor_summary.json`` plus a console table at the end.

    Args:
        config: a :class:`MonitorConfig`; keyword overrides of its fields may follow.
        output_dir: where :meth:`finish` writes the summary in a plain loop (under a Trainer,
            its ``output_dir`` is the default).
        **overrides: fields of :class:`MonitorConfig`, e.g. ``on_spike="skip"``.

    Example:
        >>> monitor = GradientMonitor(on_spike="skip", max_consecutive_skips=3)
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.AdamW(model.parameters())
        >>> _ = monitor.attach(model)
        >>> loss = model(torch.randn(8, 4)).pow(2).mean(); loss.backward()
        >>> monitor.step(opt, loss=loss)  # True: the update was applied
        True
    """

    def __init__(self, config: MonitorConfig | None = None, *, output_dir: str | None = None,
                 **overrides: Any):
        self.config = dataclasses.replace(config or MonitorConfig(), **overrides)
        self.output_dir = output_dir
        self._core: MonitorCore | None = None
        self._deferred_state: dict[str, Any] | None = None
        self._hook: Any = None
        self._patches = glue.Patches()  # Trainer/optimizer overrides, undone at the end
        self._trainer: Any = None
        self._scaler: Any = None
        self._skip_now = False  # read by the patched optimizer.step
        self._sched_backup: Any = None
        self._snapshot: list[torch.Tensor] | None = None
        self._loss_mark: torch.Tensor | None = None
        self._recorded_step = -1
        self._ds_seen: dict[str, Any] | None = None  # under DeepSpeed: the last backward's loss
        self._ds_remove: Any = None
        self._ds_engine: Any = None
        self._optimizer: Any = None

    @property
    def gated(self) -> bool:
        """Whether a ``skip``/``stop`` policy needs each step's verdict before its update."""
        return any(getattr(self.config, "on_" + k) != "warn" for k in KINDS)

    @property
    def history(self) -> list[dict[str, float]]:
        """One dict of metrics per logging interval, with its last ``step``."""
        return self._core.history if self._core else []

    @property
    def skipped_steps(self) -> list[int]:
        """Optimizer steps whose update a ``skip`` policy held back."""
        return self._core.skipped_steps if self._core else []

    @property
    def anomalies(self) -> list[dict[str, Any]]:
        """One record per (kind, block, parameter): first/last step, count, message."""
        return self._core.log.records if self._core else []

    # ----- plain-loop API -------------------------------------------------------------

    def attach(self, model: nn.Module) -> GradientMonitor:
        """Index the trainable parameters of ``model``; call again if that set changes."""
        self.detach()
        plan = ParamPlan.build(model)
        peak = self.config.peak_flops or default_peak_flops(plan.device)
        self._core = MonitorCore(self.config, plan, flops_per_token(model), peak)
        self._recorded_step = -1
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        if self._deferred_state is not None:
            state, self._deferred_state = self._deferred_state, None
            self._core.load_state_dict(state)
        return self

    def detach(self) -> None:
        """Remove the token-counting hook and every Trainer patch."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._patches.undo()
        if self._ds_remove is not None:
            self._ds_remove()
        self._ds_seen, self._ds_remove, self._ds_engine = None, None, None

    def step(self, optimizer: torch.optim.Optimizer, *, loss: torch.Tensor | None = None,
             lr_scheduler: Any = None, max_grad_norm: float | None = None) -> bool:
        """Check the gradients, then clip and step unless a policy holds this update back.

        Call after ``loss.backward()`` in place of clipping, ``optimizer.step()`` and
        ``lr_scheduler.step()``; zero the gradients yourself afterwards either way. Weight
        norms, update ratios and zero fractions are measured every ``log_every`` steps (at
        most once per ``detail_every``).

        Returns:
            True if the update was applied, False if it was skipped.

        Raises:
            GradientAnomalyError: a ``stop`` policy fired or too many steps in a row were skipped.
        """
        core = self._require_core()
        step = core.last_step + 1
        every = self.config.log_every or 1
        measure = step % every == 0 and glue.opens_detail_window(step, every, max(1, self.config.detail_every))
        self._record(step, loss, max_grad_norm, measure)
        if self.gated and self._verdict() != "apply":
            self._mark_skipped(step)
            return False
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(core.plan.params, max_grad_norm)
        before = core.plan.snapshot() if measure and self.config.update_ratio else None
        optimizer.step()
        if before is not None:
            core.record_update(before)
        if lr_scheduler is not None:
            lr_scheduler.step()
        return True

    def flush_metrics(self) -> dict[str, float]:
        """Copy the interval's statistics to the host (one sync) and return its metrics.

        Example:
            ``tracker.log(monitor.flush_metrics(), step=step)`` every N steps.
        """
        return self._require_core().flush_metrics()

    def finish(self, output_dir: str | None = None, *, echo: bool = True) -> dict[str, Any]:
        """Close the last interval, write the JSON summary, print the console table.

        Returns:
            The summary (see ``docs/monitor.md`` for its fields).
        """
        core = self._require_core()
        if core.has_open_interval:
            core.flush_metrics()
        summary = core.summary(dataclasses.asdict(self.config))
        out_dir = output_dir or self.output_dir
        path = os.path.join(out_dir, self.config.summary_file) if out_dir else None
        if core.is_main:
            if path:
                write_json(summary, path)
            if echo:
                print(format_summary(summary, path), flush=True)
        return summary

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this run left off (plain JSON)."""
        return self._require_core().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; called before :meth:`attach`, it applies on attach."""
        if self._core is None:
            self._deferred_state = state
        else:
            self._core.load_state_dict(state)

    # ----- internals shared by both APIs ----------------------------------------------

    def _require_core(self) -> MonitorCore:
        if self._core is None:
            raise RuntimeError("GradientMonitor: call monitor.attach(model) first")
        return self._core

    def _count(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training and torch.is_grad_enabled():  # training forwards, not eval/reference
            self._core.count_forward(*count_tokens(args, kwargs))

    def _record(self, step: int, loss: torch.Tensor | None, max_norm: float | None,
                measure: bool, inv_scale: torch.Tensor | None = None) -> None:
        scaler = self._scaler
        if (inv_scale is None and scaler is not None and getattr(scaler, "_scale", None) is not None
                and glue.grads_still_scaled(scaler, self._optimizer)):
            inv_scale = scaler._scale.double().reciprocal().float()
        self._require_core().record(step, loss, max_norm, measure=measure, inv_scale=inv_scale)
        self._recorded_step = step

    def _mark_skipped(self, step: int) -> None:
        # EMA (and anything else that reads the trainable set) leaves this step out too.
        ts = self._require_core().plan.trainable
        if ts is not None:
            ts.skip(step)

    def _verdict(self) -> str:
        try:
            return self._require_core().verdict()
        except GradientAnomalyError:
            # Leave a summary and a clean optimizer behind before the error unwinds train().
            out_dir = self.output_dir or getattr(getattr(self._trainer, "args", None),
                                                 "output_dir", None)
            try:
                self.finish(out_dir)
            finally:
                self.detach()
            raise

    # ----- TrainerCallback events -----------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None,
                       lr_scheduler=None, **kwargs):
        self._trainer, resume = find_trainer_on_stack()
        trainer = self._trainer
        self.attach(model)
        self._core.is_main = state.is_world_process_zero
        if state.is_world_process_zero:
            plan, c = self._core.plan, self.config
            policies = ", ".join(f"{k} {getattr(c, 'on_' + k)}" for k in KINDS)
            note(f"monitor: watching {plan.num_params} tensors in {plan.num_groups} blocks; on {policies}")
        self._scaler = glue.loss_scaler(optimizer)
        self._optimizer = optimizer
        self._core.loss_scaled = self._scaler is not None
        if state.global_step > 0:  # resuming: pick up the history saved with the checkpoint
            ckpt = resume or checkpoint_dir(args, state.global_step)
            path = os.path.join(ckpt, STATE_FILE)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as fh:
                    self._core.load_state_dict(json.load(fh))
            else:
                logger.warning("GradientMonitor: no %s to resume from; history starts anew", path)
        if trainer is None:
            logger.warning("GradientMonitor: no transformers.Trainer found on the call stack; "
                           "gradients are read after clipping, loss is not tracked and "
                           "trackers registered before the monitor miss its metrics.")
        else:
            put_ahead_of_trackers(trainer.callback_handler, self)
            engine = deepspeed_engine(trainer)
            if engine is not None:
                self._ds_seen = glue.track_deepspeed_loss(self._patches, engine)
                self._ds_engine = engine
                self._ds_remove = before_deepspeed_step(engine, self._deepspeed_before_step)
                return  # DeepSpeed clips and steps inside its engine; the monitor is in there
            if args.max_grad_norm and hasattr(trainer, "_clip_grad_norm"):
                original = trainer._clip_grad_norm

                def clip_after_recording(model_arg):
                    # The last point where the gradients are complete and still unclipped.
                    step = trainer.state.global_step + 1
                    self._record(step, self._trainer_loss(), trainer.args.max_grad_norm,
                                 self._measures(trainer.args, trainer.state, step))
                    return original(model_arg)

                self._patches.set(trainer, "_clip_grad_norm", clip_after_recording)
        if self.gated and optimizer is not None:
            glue.patch_skippable_step(self._patches, optimizer, lambda: self._skip_now)

    def _deepspeed_before_step(self) -> bool:
        """Inside DeepSpeed's optimizer step: record, judge; True to apply the update."""
        trainer = self._trainer
        step = trainer.state.global_step + 1
        loss = self._trainer_loss()
        last = self._ds_seen["loss"] if self._ds_seen else None
        if last is not None:  # the Trainer adds the last micro-batch's loss after this step
            loss = last if loss is None else loss + last.to(loss.device)
        measure = self._measures(trainer.args, trainer.state, step)
        # DeepSpeed unscales (fp16) and clips after this hook, with its own clip setting.
        scale, clip = deepspeed_grad_scaling(self._ds_engine)
        inv_scale = None if scale == 1.0 else torch.tensor(1.0 / scale)
        self._record(step, loss, clip or None, measure, inv_scale=inv_scale)
        if self.gated and self._verdict() == "skip":
            self._mark_skipped(step)
            return False
        if self.config.update_ratio and measure:  # measured at on_optimizer_step, as without it
            self._snapshot = self._core.plan.snapshot()
        return True

    def _measures(self, args: Any, state: Any, step: int) -> bool:
        """Whether this step measures the extras (update ratios, zero fractions)."""
        return glue.measures_details(args, state, step, self.config.log_every, self.config.detail_every)

    def _trainer_loss(self) -> torch.Tensor | None:
        acc = getattr(self._trainer, "_tr_loss", None)
        if acc is None or self._loss_mark is None:
            return None
        return acc - self._loss_mark  # the sum of this step's (GA-scaled) micro-batch losses

    def on_step_begin(self, args, state, control, **kwargs):
        acc = getattr(self._trainer, "_tr_loss", None)
        if isinstance(acc, torch.Tensor):
            self._loss_mark = acc.detach().clone()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None,
                              **kwargs):
        if self._ds_seen is not None or self._core is None:
            return  # under DeepSpeed the step was recorded (and taken) inside the engine
        step = state.global_step + 1
        measure = self._measures(args, state, step)
        if self._recorded_step != step:  # no clipping configured (or no Trainer found)
            self._record(step, self._trainer_loss(), None, measure)
        if self.gated and self._verdict() == "skip":
            self._skip_now = True
            self._mark_skipped(step)
            self._sched_backup = glue.scheduler_backup(lr_scheduler, optimizer)
        elif self.config.update_ratio and measure:
            self._snapshot = self._core.plan.snapshot()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._snapshot is not None:
            self._core.record_update(self._snapshot)
            self._snapshot = None

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if self._skip_now:
            glue.scheduler_restore(self._sched_backup, lr_scheduler, optimizer)
            self._skip_now, self._sched_backup = False, None
        if self.config.log_every and state.global_step % self.config.log_every == 0:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        core = self._core
        if logs is None or core is None or not core.has_open_interval:
            return
        if is_eval_log(logs):
            return
        metrics = core.flush_metrics()
        compact = {k: v for k, v in metrics.items() if k.count("/") < 2}  # no per-block keys
        # The global metrics go to trainer_state.json too, the per-block ones only to the
        # trackers and the summary file.
        add_figures(logs, state, metrics if self.config.log_layers else compact, history=compact)

    def on_save(self, args, state, control, **kwargs):
        if self._core is None:
            return
        state_dict = self._core.state_dict()
        if self._core.is_main:
            ckpt = checkpoint_dir(args, state.global_step)
            write_json(state_dict, os.path.join(ckpt, STATE_FILE), strict=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self._core is None:
            return
        try:
            self.finish(self.output_dir or args.output_dir)
        finally:
            self.detach()


def from_preset(cfg: MonitorConfig, model: Any, training_args: Any) -> dict[str, Any]:
    """Trainer keyword arguments for the ``monitor:`` preset section.

    Example:
        >>> from_preset(MonitorConfig(enabled=False), None, None)
        {}
    """
    if not cfg.enabled:
        return {}
    return {"callbacks": [GradientMonitor(cfg)]}
