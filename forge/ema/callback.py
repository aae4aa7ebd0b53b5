"""HF ``Trainer`` integration of the EMA: :class:`EMACallback`.

Callback events carry the model, the state and
the dataloaders, but not the trainer itself nor the path given to
``train(resume_from_checkpoint=...)``. The callback needs both (to run the Trainer's own
evaluation loop with the EMA weights, to save the final model the way the Trainer does, and to
find the checkpoint to resume from), so it looks them up on the call stack once, at
``on_train_begin``; ``EMACallback(trainer=...)`` skips the look-up.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

import torch
from transformers import TrainerCallback

from forge.core.console import note
from forge.core.figures import add_figures, is_eval_log, put_ahead_of_trackers
from forge.core.paths import checkpoint_dir
from forge.core.trainable import skip_flag
from forge.core.trainer_lookup import find_trainer_on_stack
from forge.ema.core import EMAWeights
from forge.ema.schedule import (
    SCHEDULE_KEYS,
    as_dtype,
    check_settings,
    run_length_advice,
)

logger = logging.getLogger("forge.ema")

EMA_WEIGHTS_NAME = "ema.safetensors"


def checkpoint_candidates(explicit: str | None, stack: str | None, args: Any, global_step: int) -> list[str]:
    """Where a resumed run's EMA may be, best guess first, without duplicates."""
    found = [
        explicit,
        stack,
        args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None,
        checkpoint_dir(args, global_step) if args.output_dir else None,
    ]
    out: list[str] = []
    for path in found:
        if path and path not in out:
            out.append(path)
    return out


def metric_prefix(metrics: dict[str, float]) -> str:
    """``"eval"`` or ``"eval_<dataset>"``: the prefix the Trainer gave this evaluation's metrics."""
    for suffix in ("_runtime", "_loss"):
        for key in metrics:
            if key.endswith(suffix):
                return key[: -len(suffix)]
    return "eval"


def run_ema_evaluation(trainer: Any, dataloader: Any, prefix: str) -> dict[str, float]:
    """The Trainer's own evaluation loop (same batches, metrics and gathering) under ``prefix``."""
    output = trainer.evaluation_loop(
        dataloader,
        description="Evaluation (EMA)",
        # Same rule as Trainer.evaluate: no need to gather predictions without compute_metrics.
        prediction_loss_only=True if trainer.compute_metrics is None else None,
        metric_key_prefix=prefix,
    )
    metrics = dict(output.metrics)
    # TRL trainers collect their own evaluation figures (token accuracy, entropy, rewards)
    # in `_metrics["eval"]` and add them under `eval_*` at the next log; taken here, they
    # are the EMA pass's and must carry its prefix, never overwrite the raw pass's values.
    store = getattr(trainer, "_metrics", None)
    collected = store.get("eval") if isinstance(store, dict) else None
    if collected:
        for key, values in collected.items():
            if values:
                metrics[f"{prefix}_{key}"] = float(sum(values) / len(values))
        collected.clear()
    # The progress callback closes its evaluation bar in on_evaluate, which already ran.
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "prediction_bar", None)
        if bar is not None:
            bar.close()
            callback.prediction_bar = None
    return metrics


class EMACallback(TrainerCallback):
    """Keeps an :class:`EMAWeights` of the model a ``Trainer`` trains; checkpointed and resumable.

    * updates after every optimizer step (``on_step_end``, after gradient accumulation);
    * writes ``ema.safetensors`` (tensors + step and settings) into every checkpoint, and on
      ``trainer.train(resume_from_checkpoint=...)`` reloads it, so a resumed run ends with the
      same EMA as an uninterrupted one (bit-identical on CPU);
    * ``eval_with_ema=True``: after each evaluation, runs the Trainer's evaluation loop again with
      the EMA weights swapped in and logs ``eval_ema_loss`` etc. next to ``eval_loss`` (they are
      also added to the metrics, so ``metric_for_best_model="eval_ema_loss"`` works);
    * ``save_ema_model=True``: at the end of training the model takes the EMA weights and is saved
      to ``output_dir`` the way ``trainer.save_model`` does (only the adapter for PEFT models).
      Any later ``trainer.save_model()`` / ``push_to_hub()`` therefore also saves the EMA.

    Distributed: under DDP each rank keeps the same EMA and only the saving rank writes; under
    FSDP2 each rank keeps its shard, which is gathered for saving.

    The callback finds its ``Trainer`` (for ``eval_with_ema``, ``save_ema_model`` and the resume
    path) on the call stack at ``on_train_begin``; pass ``trainer=`` to be explicit. Settings are
    those of :class:`EMAWeights`, plus:

    Args:
        eval_with_ema: also evaluate with the EMA weights, metrics under ``<prefix>_ema_*``.
        save_ema_model: make the EMA the final model and save it to ``args.output_dir``.
        trainer: the ``Trainer``; only needed when it cannot be found automatically.
        resume_from_checkpoint: checkpoint folder to load the EMA from, when resuming from a
            folder the callback cannot see (``train(resume_from_checkpoint=...)`` is seen).

    Example:
        >>> from transformers import Trainer
        >>> callback = EMACallback(decay=0.999, eval_with_ema=True)
        >>> # trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    """

    def __init__(
        self,
        decay: float = 0.999,
        *,
        update_every: int = 1,
        update_after_step: int = 0,
        warmup: str | None = None,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
        include_frozen: bool = False,
        include_buffers: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = torch.float32,
        eval_with_ema: bool = False,
        save_ema_model: bool = False,
        trainer: Any | None = None,
        resume_from_checkpoint: str | os.PathLike | None = None,
    ) -> None:
        schedule = dict(
            decay=decay, update_every=update_every, update_after_step=update_after_step, warmup=warmup,
            inv_gamma=inv_gamma, power=power, min_decay=min_decay,
        )  # fmt: skip
        errors = check_settings(**schedule)
        if errors:
            raise ValueError("invalid EMA settings: " + "; ".join(errors))
        as_dtype(dtype)
        self._ema_kwargs = dict(
            schedule, include_frozen=include_frozen, include_buffers=include_buffers, device=device, dtype=dtype
        )
        self.eval_with_ema = eval_with_ema
        self.save_ema_model = save_ema_model
        self.resume_from_checkpoint = os.fspath(resume_from_checkpoint) if resume_from_checkpoint else None
        self.ema: EMAWeights | None = None
        self._trainer: weakref.ref | None = weakref.ref(trainer) if trainer is not None else None
        self._warned: set[str] = set()

    def bind(self, trainer: Any) -> EMACallback:
        """Tell the callback which ``Trainer`` it serves (normally found automatically).

        Example:
            >>> callback = EMACallback()  # then: trainer.add_callback(callback.bind(trainer))
        """
        self._trainer = weakref.ref(trainer)
        return self

    @property
    def trainer(self) -> Any | None:
        """The bound ``Trainer``, if known."""
        return self._trainer() if self._trainer is not None else None

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # -- events ------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        stack_trainer, stack_resume = find_trainer_on_stack()
        if self._trainer is None and stack_trainer is not None:
            self._trainer = weakref.ref(stack_trainer)
        if self.trainer is not None:
            put_ahead_of_trackers(self.trainer.callback_handler, self)
        self.ema = EMAWeights(model, **self._ema_kwargs)
        self.ema.step = state.global_step
        if state.global_step > 0:
            self._restore(args, state, stack_resume)
        if state.is_world_process_zero:
            ema = self.ema
            numel = sum(t.numel() for t in ema.shadow.values())
            note(f"ema: averaging {numel:,} parameters in {len(ema.shadow)} tensors "
                 f"({ema.nbytes / 2**20:.1f} MiB, {ema.settings()['dtype']}), decay {ema.decay}"
                 + (", from the checkpoint's EMA" if state.global_step > 0 else ""))
            advice = run_length_advice(
                state.max_steps,
                sum(p.numel() for p in model.parameters()),
                **{k: self._ema_kwargs[k] for k in SCHEDULE_KEYS},
            )
            if advice:
                self._warn_once("advice", advice)

    def _restore(self, args, state, stack_resume: str | None) -> None:
        assert self.ema is not None
        for folder in checkpoint_candidates(self.resume_from_checkpoint, stack_resume, args, state.global_step):
            path = os.path.join(folder, EMA_WEIGHTS_NAME)
            if os.path.isfile(path):
                self.ema.load(path)
                if self.ema.step != state.global_step:
                    logger.warning("EMA in %s is from step %d, training resumes at step %d.",
                                   path, self.ema.step, state.global_step)  # fmt: skip
                    self.ema.step = state.global_step
                return
        self._warn_once(
            "no-ema", "Resuming at step %d but no %s was found; the EMA restarts from the current weights.",
            state.global_step, EMA_WEIGHTS_NAME,
        )  # fmt: skip

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.ema is None:  # added after training started
            self.ema = EMAWeights(model, **self._ema_kwargs)
        if skip_flag(model, state.global_step):
            return  # the monitor held this step's update back: the average leaves it out too
        self.ema.update(model, step=state.global_step)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self.ema is None or model is None or is_eval_log(logs):
            return
        add_figures(logs, state, self.ema.figures(model))

    def on_save(self, args, state, control, **kwargs):
        if self.ema is not None:
            path = os.path.join(checkpoint_dir(args, state.global_step), EMA_WEIGHTS_NAME)
            self.ema.save(path, write=args.should_save)

    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None, **kwargs):
        if not self.eval_with_ema or self.ema is None or metrics is None or eval_dataloader is None:
            return
        trainer = self.trainer
        if trainer is None:
            self._warn_once("eval", "eval_with_ema needs the Trainer: use EMACallback(trainer=...) or .bind().")
            return
        with self.ema.apply_to(model):
            ema_metrics = run_ema_evaluation(trainer, eval_dataloader, metric_prefix(metrics) + "_ema")
        trainer.log(dict(ema_metrics))
        metrics.update(ema_metrics)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not self.save_ema_model or self.ema is None:
            return
        if args.load_best_model_at_end:
            self._warn_once("best", "save_ema_model replaces the best checkpoint's weights with the EMA weights.")
        self.ema.copy_to(model)
        trainer = self.trainer
        if trainer is not None:
            trainer.save_model(args.output_dir)
        elif args.should_save:
            model.save_pretrained(args.output_dir)
            if processing_class is not None:
                processing_class.save_pretrained(args.output_dir)
        if state.is_world_process_zero:
            logger.info("Saved the EMA weights as the final model in %s.", args.output_dir)
