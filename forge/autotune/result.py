"""The result of :func:`forge.autotune.autotune_batch_size`: its table, and its checkpoint record.

A resumed run must use the batch the interrupted run used: the Trainer skips the batches it
already trained on by counting them at the current batch size, so a different choice (another
GPU, other free memory) would replay or drop data. :class:`AutotuneCallback` writes the choice
into every checkpoint as ``autotune.json``, and ``autotune_batch_size(...,
resume_from_checkpoint=...)`` reuses it instead of probing again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback

from forge.autotune.data import format_bytes
from forge.autotune.search import LinearFit, Probe
from forge.core.figures import add_figures, is_eval_log, put_ahead_of_trackers
from forge.core.io import write_json
from forge.core.paths import checkpoint_dir
from forge.core.trainer_lookup import find_trainer_on_stack


@dataclass
class AutotuneResult:
    """What autotuning measured and chose.

    Attributes:
        per_device_train_batch_size: examples per device per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        world_size: data-parallel processes the choice was made for.
        global_batch: ``per_device * accumulation * world_size``, examples per optimizer step.
        target_global_batch: what was asked for (None: the largest per-device batch).
        max_per_device: the memory model's largest per-device batch under the budget with
            the margin, capped at what the target needs.
        seq_len: tokens per row in the probes.
        budget: bytes a step may use on one device (after ``reserved``).
        reserved: bytes held back for what the probe cannot see (DDP buckets, a reference model).
        safety_margin: fraction of the budget the prediction kept free.
        mode: ``cuda`` (allocator peak), ``live`` (live-tensor high-water mark, any other
            device) or ``reused`` (read from a checkpoint, no probes).
        probes: the training probes, in order.
        fit: the fitted ``bytes = intercept + per_sample * batch``.
        backed_off: the confirm probe did not fit and a smaller batch was taken.
        optimizer_bytes: optimizer state the training probes allocated.
        per_device_eval_batch_size: the tuned evaluation batch, or None when not tuned.
        eval_probes: the evaluation probes.
        eval_budget: bytes an evaluation forward may use (the budget less optimizer state,
            which stays allocated when the Trainer evaluates mid-run).
        seconds: wall time of the whole decision.
        notes: anything the user should know about the choice, one sentence each.

    Example:
        >>> result = autotune_batch_size(model, max_memory="2GB", seq_len=512)
        >>> result.per_device_train_batch_size, result.gradient_accumulation_steps
        (24, 1)
    """

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    global_batch: int
    target_global_batch: int | None
    max_per_device: int
    seq_len: int
    budget: int
    reserved: int = 0
    safety_margin: float = 0.05
    mode: str = "live"
    probes: list[Probe] = field(default_factory=list)
    fit: LinearFit | None = None
    backed_off: bool = False
    optimizer_bytes: int = 0
    per_device_eval_batch_size: int | None = None
    eval_probes: list[Probe] = field(default_factory=list)
    eval_budget: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Whether the global batch equals the target (True when there was no target)."""
        return self.target_global_batch is None or self.global_batch == self.target_global_batch

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for JSON logs."""
        return dataclasses.asdict(self)


def _probe_rows(probes: list[Probe], budget: int | None, label: str) -> list[str]:
    rows = []
    for i, p in enumerate(probes, 1):
        share = f"{p.bytes / budget:6.1%}" if p.bytes is not None and budget else "     -"
        fits = "yes" if p.ok else ("OOM" if p.bytes is None else "no")
        rows.append(f"{label:<5} {i:>2}  {p.batch_size:>6}  {format_bytes(p.bytes):>10}  {share}  "
                    f"{fits:<4} {p.role:<8} {p.seconds:6.2f}s")
    return rows


def format_table(result: AutotuneResult) -> str:
    """The probes and the choice as a small text table (what ``forge autotune`` prints).

    Example:
        >>> print(format_table(result))    # doctest: +SKIP
        autotune: live-tensor high-water mark, budget 16.00 MB (margin 5%), seq_len 32, world 1
        probe  #   batch      memory  budget fits role       time
        train  1       1     1.77 MB   11.1% yes  fit       0.03s
        ...
    """
    where = {"cuda": "CUDA allocator peak", "live": "live-tensor high-water mark",
             "reused": "reused from a checkpoint"}.get(result.mode, result.mode)
    head = (f"autotune: {where}, budget {format_bytes(result.budget)} "
            f"(margin {result.safety_margin:.0%}), seq_len {result.seq_len}, world {result.world_size}")
    if result.reserved:
        head += f", {format_bytes(result.reserved)} reserved"
    lines = [head, "probe  #   batch      memory  budget fits role       time"]
    lines += _probe_rows(result.probes, result.budget, "train")
    lines += _probe_rows(result.eval_probes, result.eval_budget, "eval")
    if result.fit is not None:
        lines.append(f"memory model: {format_bytes(result.fit.intercept)} + "
                     f"{format_bytes(result.fit.per_sample)} per example -> up to "
                     f"{result.max_per_device} per device")
    target = "" if result.target_global_batch is None else f" (target {result.target_global_batch})"
    lines.append(f"choice: per_device_train_batch_size {result.per_device_train_batch_size} x "
                 f"gradient_accumulation_steps {result.gradient_accumulation_steps} x world "
                 f"{result.world_size} = global batch {result.global_batch}{target}")
    if result.per_device_eval_batch_size is not None:
        lines.append(f"eval: per_device_eval_batch_size {result.per_device_eval_batch_size} "
                     f"(budget {format_bytes(result.eval_budget)})")
    lines += [f"note: {n}" for n in result.notes]
    lines.append(f"decided in {result.seconds:.2f}s with {len(result.probes)} training probes")
    return "\n".join(lines)


CHOICE_NAME = "autotune.json"
def figures_of(result: AutotuneResult) -> dict[str, float]:
    """The choice and the memory estimate as ``forge/autotune/...`` figures for the trackers.

    Example:
        >>> sorted(figures_of(result))[:2]
        ['forge/autotune/budget_gib', 'forge/autotune/estimated_peak_gib']
    """
    gib = float(2**30)
    out = {"forge/autotune/per_device_train_batch_size": float(result.per_device_train_batch_size),
           "forge/autotune/gradient_accumulation_steps": float(result.gradient_accumulation_steps),
           "forge/autotune/global_batch": float(result.global_batch),
           "forge/autotune/budget_gib": result.budget / gib,
           "forge/autotune/reserved_gib": result.reserved / gib}
    # The peak a probe measured at the chosen batch (it confirmed the choice), else the line's.
    measured = [p.bytes for p in result.probes if p.ok and p.bytes is not None
                and p.batch_size == result.per_device_train_batch_size]
    if measured:
        out["forge/autotune/estimated_peak_gib"] = measured[-1] / gib
    elif result.fit is not None:
        out["forge/autotune/estimated_peak_gib"] = result.fit.predict(result.per_device_train_batch_size) / gib
    return out


CHOICE_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size",
               "world_size", "global_batch", "target_global_batch", "seq_len")


def load_choice(checkpoint: str | os.PathLike | None) -> dict[str, Any] | None:
    """The choice saved in a checkpoint directory by :class:`AutotuneCallback`, or None."""
    if not checkpoint or not isinstance(checkpoint, (str, os.PathLike)):
        return None
    path = os.path.join(checkpoint, CHOICE_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class AutotuneCallback(TrainerCallback):
    """Saves the autotuned batch into every checkpoint (``autotune.json``) for resuming.

    :func:`~forge.autotune.autotune_batch_size` adds it to a Trainer it tunes; add it
    yourself when you tuned ``TrainingArguments`` before building the Trainer.

    Args:
        result: the choice to record.

    Example:
        >>> result = autotune_batch_size(model, training_args=args, max_memory="8GB", seq_len=512)
        >>> trainer = Trainer(model, args, ..., callbacks=[AutotuneCallback(result)])
    """

    def __init__(self, result: AutotuneResult | None = None) -> None:
        self.choice = {k: getattr(result, k) for k in CHOICE_KEYS} if result is not None else {}
        self._figures = figures_of(result) if result is not None else {}

    def on_train_begin(self, args, state, control, **kwargs):
        trainer, _ = find_trainer_on_stack()
        if trainer is not None:
            put_ahead_of_trackers(trainer.callback_handler, self)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The choice is logged once, at the first training log, so every tracker has it.
        if self._figures and not is_eval_log(logs):
            add_figures(logs, state, self._figures)
            self._figures = {}

    def state_dict(self) -> dict[str, Any]:
        """The recorded choice (plain ints), as written to ``autotune.json``."""
        return dict(self.choice)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a choice read from a checkpoint."""
        self.choice = {k: state.get(k) for k in CHOICE_KEYS}

    def on_save(self, args, state, control, **kwargs):
        if not self.choice or not state.is_world_process_zero:
            return
        folder = checkpoint_dir(args, state.global_step)
        if os.path.isdir(folder):
            write_json(self.state_dict(), os.path.join(folder, CHOICE_NAME))
