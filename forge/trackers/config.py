"""The ``trackers:`` preset section: validated specs (cheap) and the callbacks they become."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from forge.core.hooks import ARGS, apply_arg_updates
from forge.core.typecheck import coerce, describe, did_you_mean
from forge.trackers.redact import is_secret_key
from forge.trackers.specs import (
    MLflowSpec,
    TensorBoardSpec,
    TrackerSpec,
    WandbSpec,
    spec_fields,
)

logger = logging.getLogger("forge.trackers")

SPECS: dict[str, type[TrackerSpec]] = {s.name: s for s in (TensorBoardSpec, WandbSpec, MLflowSpec)}
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


def callbacks(specs: list[TrackerSpec], training_args: Any, preset_yaml: str | None = None) -> dict[str, Any]:
    """One forge callback per tracker, and (under ``"args"``) the ``report_to`` left for the
    Trainer's own integrations: the trackers forge serves are taken out, so each gets exactly
    one callback (others, e.g. ``comet_ml``, stay).

    Example:
        >>> specs, _ = parse_trackers(["tensorboard"])
        >>> sorted(callbacks(specs, None))
        ['args', 'callbacks']
    """
    # The backends import transformers' tracker integrations (and through them the tracker
    # packages): only a run that uses a tracker pays for that, never preset validation.
    from forge.trackers.backends import CALLBACKS

    made = []
    for spec in specs:
        if spec.name == "mlflow" and os.getenv("DISABLE_MLFLOW_INTEGRATION", "").upper() == "TRUE":
            logger.warning("forge: trackers.mlflow is skipped: DISABLE_MLFLOW_INTEGRATION=TRUE "
                           "is set in the environment.")
            continue
        made.append(CALLBACKS[spec.name](spec, preset_yaml=preset_yaml))
    report_to = getattr(training_args, "report_to", None)
    if report_to is None or report_to in ("none", ["none"]):
        report_to = []
    elif isinstance(report_to, str):
        report_to = [report_to]
    served = {s.name for s in specs}
    return {"callbacks": made, ARGS: {"report_to": [r for r in report_to if r not in served]}}


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
    extra = callbacks(specs, training_args, preset_yaml)
    if training_args is None or not specs:
        extra.pop(ARGS)
    return apply_arg_updates(training_args, extra)


__all__ = ["SPECS", "callbacks", "from_preset", "parse_trackers", "specs_to_config"]
