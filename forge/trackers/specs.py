"""The per-tracker option dataclasses of :mod:`forge.trackers` (the ``trackers:`` preset section).

Import them from :mod:`forge.trackers`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from forge.core.typecheck import coerce, describe


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrackerSpec:
    """Options every tracker takes; one subclass per tracker adds its own.

    Example:
        >>> WandbSpec(project="sweeps", mode="offline").name
        'wandb'
    """

    name: ClassVar[str] = ""
    run_name: str | None = field(default=None, metadata=_help(
        "Run name shown by the tracker; null: training.run_name (TensorBoard: a sub-directory "
        "of the log directory)."))

    def __post_init__(self) -> None:
        # Checked here too, so a callback built in Python fails as clearly as a preset does.
        for option, hint in spec_fields(type(self)).items():
            value = getattr(self, option)
            if not coerce(value, hint)[0]:
                raise ValueError(f"{option}: expected {describe(hint)}, got {value!r}")
        every = getattr(self, "histogram_every", 0)
        if every < 0:
            raise ValueError(f"histogram_every: {every} must be 0 (off) or a number of steps")


@dataclass
class TensorBoardSpec(TrackerSpec):
    """``trackers: {tensorboard: {...}}``: where the event files go, histogram interval."""

    name: ClassVar[str] = "tensorboard"
    logging_dir: str | None = field(default=None, metadata=_help(
        "Event file directory; null: $TENSORBOARD_LOGGING_DIR, else "
        "output_dir/runs/<run_name or time_host>."))
    histogram_every: int = field(default=100, metadata=_help(
        "Log per-block gradient histograms every N optimizer steps (0: never)."))


@dataclass
class WandbSpec(TrackerSpec):
    """``trackers: {wandb: {...}}``: the W&B run's project, name, tags and mode."""

    name: ClassVar[str] = "wandb"
    project: str | None = field(default=None, metadata=_help(
        "W&B project; null: $WANDB_PROJECT, else 'huggingface' (as transformers does)."))
    entity: str | None = field(default=None, metadata=_help("W&B team or user; null: yours."))
    group: str | None = field(default=None, metadata=_help("Group runs together (a sweep)."))
    tags: list[str] = field(default_factory=list, metadata=_help("Run tags, e.g. [sft, lora]."))
    mode: Literal["online", "offline", "disabled"] | None = field(default=None, metadata=_help(
        "online | offline (no account needed; `wandb sync` later) | disabled; null: $WANDB_MODE."))
    histogram_every: int = field(default=100, metadata=_help(
        "Log per-block gradient histograms every N optimizer steps (0: never)."))
    log_model: bool = field(default=False, metadata=_help(
        "Upload the final model (the adapter under PEFT) as a W&B artifact."))


@dataclass
class MLflowSpec(TrackerSpec):
    """``trackers: {mlflow: {...}}``: tracking server, experiment, tags."""

    name: ClassVar[str] = "mlflow"
    tracking_uri: str | None = field(default=None, metadata=_help(
        "sqlite:///mlflow.db, http://host:5000, ...; null: $MLFLOW_TRACKING_URI, else ./mlruns."))
    experiment_name: str | None = field(default=None, metadata=_help(
        "Experiment (created if missing); null: $MLFLOW_EXPERIMENT_NAME, else Default."))
    tags: list[str] | dict[str, str] = field(default_factory=dict, metadata=_help(
        "Run tags: {team: nlp} or a list of names."))
    log_model: bool = field(default=False, metadata=_help(
        "Log the final model (the adapter under PEFT) as run artifacts under model/."))


def spec_fields(cls: type[TrackerSpec]) -> dict[str, Any]:
    """Option name -> type hint of a spec class (its dataclass fields, not ``name``).

    Example:
        >>> list(spec_fields(TensorBoardSpec))
        ['run_name', 'logging_dir', 'histogram_every']
    """
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}
