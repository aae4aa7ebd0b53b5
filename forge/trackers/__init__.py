"""Experiment trackers (TensorBoard, W&B, MLflow) that also show what forge measures.

The transformers integration callbacks log the Trainer's scalars. Forge's callbacks extend
them: forge figures (any log key under ``forge/``, e.g. ``forge/grad_norm/layer_07`` from the
gradient monitor) keep that name in every tracker, per-block gradient histograms are logged
every ``histogram_every`` steps (TensorBoard, W&B), the resolved preset is stored with the run,
the final model can be logged as an artifact, secrets never leave the machine, and a tracker
that fails mid-run warns once while training goes on.

In a preset::

    trackers: [tensorboard, mlflow]                  # defaults
    trackers:                                        # or with options
      wandb: {project: my-project, mode: offline, tags: [sft]}
      mlflow: {tracking_uri: "sqlite:///mlflow.db", experiment_name: sft}

On a plain Trainer (leave these trackers out of ``report_to``, or each logs twice)::

    from forge.trackers import ForgeTensorBoardCallback
    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[ForgeTensorBoardCallback(histogram_every=50)])
"""

import importlib
from typing import Any

from forge.trackers.base import FORGE_PREFIX, MissingTrackerError, grad_histograms
from forge.trackers.config import SPECS, from_preset, parse_trackers, specs_to_config
from forge.trackers.redact import (
    REDACTED,
    is_secret_key,
    redact,
    redact_text,
    redact_yaml,
)
from forge.trackers.specs import (
    MLflowSpec,
    TensorBoardSpec,
    TrackerSpec,
    WandbSpec,
    spec_fields,
)

# The callbacks subclass transformers' tracker integrations, whose import pulls in the tracker
# packages themselves (and their console chatter): they load when first used, not on
# `import forge.trackers` (which preset validation does).
_BACKENDS = ("CALLBACKS", "ForgeMLflowCallback", "ForgeTensorBoardCallback", "ForgeWandbCallback")


def __getattr__(name: str) -> Any:
    if name in _BACKENDS:
        return getattr(importlib.import_module("forge.trackers.backends"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CALLBACKS", "FORGE_PREFIX", "ForgeMLflowCallback", "ForgeTensorBoardCallback",
           "ForgeWandbCallback", "MLflowSpec", "MissingTrackerError", "REDACTED", "SPECS",
           "TensorBoardSpec", "TrackerSpec", "WandbSpec", "from_preset", "grad_histograms",
           "is_secret_key", "parse_trackers", "redact", "redact_text", "redact_yaml",
           "spec_fields", "specs_to_config"]
