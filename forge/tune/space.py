"""The search space of ``forge sweep``: preset keys and the distribution of each.

A YAML mapping from dotted preset keys to one distribution each::

    training.learning_rate: {log_uniform: [1.0e-5, 1.0e-3]}
    training.warmup_ratio: {uniform: [0.0, 0.1]}
    peft.r: {choice: [8, 16, 32]}
    training.gradient_accumulation_steps: {int: [1, 4]}       # [low, high], both included
    data.max_length: {int: [256, 1024], step: 256}

Every problem (a bad distribution, an unknown preset key, a value the preset refuses) is one
``file: key: message`` line, all collected and raised at once, before anything loads.

Example:
    >>> space = load_space("space.yaml", preset="lora")
    >>> space["peft.r"].kind
    'choice'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from forge.errors import ConfigError, ForgeError

KINDS = ("log_uniform", "uniform", "int", "choice")
_KEYS_ELSEWHERE = ("training.output_dir",)  # the sweep sets these itself, per trial


@dataclass(frozen=True)
class Param:
    """One searched key: ``kind`` and its bounds (``low``, ``high``, ``step``) or ``choices``."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial draws for this key."""
        if self.kind == "log_uniform":
            return trial.suggest_float(self.key, self.low, self.high, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.key, self.low, self.high)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=self.step or 1)
        return trial.suggest_categorical(self.key, list(self.choices))

    def extremes(self) -> list[Any]:
        """Values that span the range: checked against the preset before the sweep starts."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice {list(self.choices)}"
        step = f" step {self.step}" if self.step else ""
        return f"{self.kind} [{self.low:g}, {self.high:g}]{step}"


def _number(value: Any) -> Any:
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _parse(key: str, spec: Any) -> tuple[Param | None, str | None]:
    if not isinstance(spec, dict) or len([k for k in spec if k in KINDS]) != 1:
        return None, f"expected one of {{{', '.join(k + ': ...' for k in KINDS)}}}, got {spec!r}"
    kind = next(k for k in spec if k in KINDS)
    extra = sorted(set(spec) - {kind, "step"}) + (["step"] if "step" in spec and kind != "int" else [])
    if extra:
        return None, f"unknown option(s) {', '.join(map(str, extra))} for {kind}"
    values = spec[kind]
    if kind == "choice":
        if not isinstance(values, list) or not values:
            return None, "choice: expected a non-empty list of values"
        if any(isinstance(v, (dict, list)) for v in values):
            return None, "choice: values must be plain numbers, strings or booleans"
        return Param(key, kind, choices=tuple(_number(v) for v in values)), None
    if not isinstance(values, list) or len(values) != 2:
        return None, f"{kind}: expected [low, high], got {values!r}"
    low, high = (_number(v) for v in values)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
    if not numeric:
        return None, f"{kind}: bounds must be finite numbers, got {values!r}"
    if kind == "int" and not all(float(v).is_integer() for v in (low, high)):
        return None, f"int: bounds must be whole numbers, got {values!r}"
    if not low < high:
        return None, f"{kind}: low must be below high, got [{low}, {high}]"
    if kind == "log_uniform" and low <= 0:
        return None, f"log_uniform: low must be above 0, got {low}"
    step = spec.get("step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 1):
        return None, f"step: expected a positive whole number, got {step!r}"
    return Param(key, kind, float(low), float(high), step), None


def parse_space(data: Any, source: str) -> dict[str, Param]:
    """Parse a space mapping; every problem is one ``source: key: message`` line in a ConfigError."""
    if not isinstance(data, dict) or not data:
        raise ForgeError(f"{source}: a search space must be a non-empty mapping of preset keys, e.g. "
                         "training.learning_rate: {log_uniform: [1.0e-5, 1.0e-3]}")
    params, problems = {}, []
    for key, spec in data.items():
        key = str(key)
        if key.count(".") < 1 or any(not part for part in key.split(".")):
            problems.append(f"{source}: {key}: expected a dotted preset key such as training.learning_rate")
            continue
        if key in _KEYS_ELSEWHERE:
            problems.append(f"{source}: {key}: set by the sweep itself (one directory per trial)")
            continue
        param, problem = _parse(key, spec)
        if problem:
            problems.append(f"{source}: {key}: {problem}")
        else:
            params[key] = param
    if problems:
        raise ConfigError(problems)
    return params


def check_against_preset(params: dict[str, Param], preset: str, overrides: dict[str, Any], source: str) -> None:
    """Load the preset with each extreme value of each key: an unknown key or a refused value is
    a ``source: key: message`` line (the preset's own message), all raised together."""
    from forge.config.loader import load_preset

    problems = []
    for key, param in params.items():
        for value in param.extremes():
            try:
                load_preset(preset, {**overrides, key: value})
            except ConfigError as err:
                mine = [p.split(": ", 2)[-1] for p in err.problems if f" {key}:" in f" {p}"]
                others = [p for p in err.problems if f" {key}:" not in f" {p}"]
                if not mine and others:
                    mine = others
                problems += [f"{source}: {key}: {m} (value {value!r})" for m in mine]
                break
    if problems:
        raise ConfigError(problems)


def load_space(path: str | Path, preset: str | None = None,
               overrides: dict[str, Any] | None = None) -> dict[str, Param]:
    """Read and check a space file; with ``preset``, check its keys and values against it too.

    Raises:
        ForgeError: the file cannot be read or is not YAML.
        ConfigError: one line per problem, naming the key.
    """
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ForgeError(f"--space: file '{path}' not found") from None
    except OSError as err:
        raise ForgeError(f"--space: cannot read '{path}': {err.strerror}") from None
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise ForgeError(f"{path}: invalid YAML: {first}") from None
    params = parse_space(data, str(path))
    if preset is not None:
        check_against_preset(params, preset, overrides or {}, str(path))
    return params
