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

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from forge._trackers_backends import (ForgeMLflowCallback, ForgeTensorBoardCallback,
                                      ForgeWandbCallback)
from forge._trackers_base import FORGE_PREFIX, MissingTrackerError, grad_histograms
from forge._trackers_redact import REDACTED, is_secret_key, redact, redact_text, redact_yaml
from forge._trackers_specs import MLflowSpec, TensorBoardSpec, TrackerSpec, WandbSpec, spec_fields
from forge._typecheck import coerce, describe, did_you_mean

logger = logging.getLogger("forge.trackers")

# The classes live in private modules to keep each file to one concept; they are documented here.
# (Not the spec dataclasses: typing.get_type_hints resolves their fields in their own module.)
for _cls in (ForgeMLflowCallback, ForgeTensorBoardCallback, ForgeWandbCallback,
             MissingTrackerError):
    _cls.__module__ = __name__


SPECS: dict[str, type[TrackerSpec]] = {s.name: s for s in (TensorBoardSpec, WandbSpec, MLflowSpec)}
CALLBACKS: dict[str, type] = {"tensorboard": ForgeTensorBoardCallback, "wandb": ForgeWandbCallback,
                              "mlflow": ForgeMLflowCallback}
_SHAPES = "a list such as [tensorboard, mlflow] or a mapping such as {wandb: {project: x}}"


def _entries(value: Any, problems: list[str]) -> list[tuple[str, Any, Any]]:
    """``(key for messages, tracker name, options)`` for each tracker the preset lists."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        return [(str(name), name, options) for name, options in value.items()]
    if not isinstance(value, list):
        problems.append(f"trackers: expected {_SHAPES}, got {value!r}")
        return []
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            out.append((str(i), item, None))
        elif isinstance(item, dict) and len(item) == 1:
            name, options = next(iter(item.items()))
            out.append((str(name), name, options))
        else:
            problems.append(f"trackers.{i}: expected a tracker name or a one-key mapping such "
                            f"as {{wandb: {{project: x}}}}, got {item!r}")
    return out


def parse_trackers(value: Any) -> tuple[list[TrackerSpec], list[str]]:
    """Validate a preset's ``trackers:`` section: the specs, and every problem found.

    Accepts a list of names (``[tensorboard, mlflow]``), a list of names and one-key
    mappings (``[tensorboard, {wandb: {project: x}}]``), a mapping of name to options
    (``{wandb: {mode: offline}, mlflow: null}``; ``false`` switches an inherited tracker off)
    or a single name.

    Args:
        value: the raw section (None or empty: no trackers).

    Returns:
        ``(specs, problems)``; each problem reads ``"trackers.<key>: message"``.

    Example:
        >>> specs, problems = parse_trackers({"wandb": {"projct": "x"}, "tensorboard": None})
        >>> [s.name for s in specs], problems
        (['tensorboard'], ["trackers.wandb.projct: unknown option (did you mean 'project'?)"])
    """
    problems: list[str] = []
    specs: list[TrackerSpec] = []
    seen: set[str] = set()
    for key, name, options in _entries(value if value is not None else [], problems):
        where = f"trackers.{key}"
        if not isinstance(name, str) or name not in SPECS:
            problems.append(f"{where}: unknown tracker {name!r}, expected one of "
                            f"{', '.join(SPECS)}" + did_you_mean(str(name), SPECS))
            continue
        if name in seen:
            problems.append(f"{where}: {name} is listed twice")
            continue
        seen.add(name)
        if options is False:
            continue
        if options is None or options is True:
            options = {}
        if not isinstance(options, dict):
            problems.append(f"{where}: expected a mapping of {name} options, got {options!r}")
            continue
        hints = spec_fields(SPECS[name])
        kwargs, ok = {}, True
        for option, option_value in options.items():
            if option not in hints:
                extra = " (a key that names a secret is never accepted here)" \
                    if is_secret_key(str(option)) else did_you_mean(str(option), hints)
                problems.append(f"trackers.{name}.{option}: unknown option" + extra)
                ok = False
                continue
            fits, coerced = coerce(option_value, hints[option])
            if not fits:
                problems.append(f"trackers.{name}.{option}: expected {describe(hints[option])}, "
                                f"got {option_value!r}")
                ok = False
                continue
            kwargs[option] = coerced
        if not ok:
            continue
        try:
            specs.append(SPECS[name](**kwargs))
        except ValueError as err:
            problems.append(f"trackers.{name}.{err}")
    return specs, problems


def specs_to_config(specs: list[TrackerSpec]) -> dict[str, dict[str, Any]]:
    """Specs as the mapping form of ``trackers:`` (what a resolved preset stores).

    Example:
        >>> specs_to_config([TensorBoardSpec(histogram_every=10)])
        {'tensorboard': {'run_name': None, 'logging_dir': None, 'histogram_every': 10}}
    """
    return {s.name: dataclasses.asdict(s) for s in specs}


def from_preset(specs: list[TrackerSpec], model: Any, training_args: Any,
                preset_yaml: str | None = None) -> dict[str, Any]:
    """Trainer keyword arguments for a preset's ``trackers:``: one forge callback per tracker.

    Takes the trackers it serves out of ``training_args.report_to`` (others, e.g.
    ``comet_ml``, stay), so the Trainer does not add its stock callback beside forge's and
    each tracker gets exactly one callback. An MLflow tracker is skipped, with a warning,
    while ``DISABLE_MLFLOW_INTEGRATION=TRUE``.

    Args:
        specs: from :func:`parse_trackers`.
        model: the model to train (unused today; the common ``from_preset`` signature).
        training_args: the run's ``TrainingArguments``, changed in place (``report_to``).
        preset_yaml: the resolved preset, stored with each run (secrets redacted).

    Returns:
        ``{"callbacks": [...]}``.

    Raises:
        MissingTrackerError: a tracker's package is missing (the message names the extra).

    Example:
        >>> specs, _ = parse_trackers(["tensorboard"])
        >>> from_preset(specs, None, None)["callbacks"][0].__class__.__name__
        'ForgeTensorBoardCallback'
    """
    del model
    callbacks = []
    for spec in specs:
        if spec.name == "mlflow" and os.getenv("DISABLE_MLFLOW_INTEGRATION", "").upper() == "TRUE":
            logger.warning("forge: trackers.mlflow is skipped: DISABLE_MLFLOW_INTEGRATION=TRUE "
                           "is set in the environment.")
            continue
        callbacks.append(CALLBACKS[spec.name](spec, preset_yaml=preset_yaml))
    if training_args is not None and specs:
        served = {s.name for s in specs}
        report_to = training_args.report_to
        if report_to is None or report_to in ("none", ["none"]):
            report_to = []
        elif isinstance(report_to, str):
            report_to = [report_to]
        training_args.report_to = [r for r in report_to if r not in served]
    return {"callbacks": callbacks}


__all__ = ["CALLBACKS", "FORGE_PREFIX", "ForgeMLflowCallback", "ForgeTensorBoardCallback",
           "ForgeWandbCallback", "MLflowSpec", "MissingTrackerError", "REDACTED", "SPECS",
           "TensorBoardSpec", "TrackerSpec", "WandbSpec", "from_preset", "grad_histograms",
           "is_secret_key", "parse_trackers", "redact", "redact_text", "redact_yaml",
           "spec_fields", "specs_to_config"]
