"""Check YAML values against the type hints of the dataclasses they map onto.

YAML gives us only bool/int/float/str/None/list/dict, so this handles the hints that
config dataclasses (ours, TrainingArguments, TRL and PEFT configs) actually use and
accepts anything it cannot judge rather than rejecting valid input.
"""

from __future__ import annotations

import difflib
import enum
import types
import typing
from typing import Any, Literal, Union


def coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """Return ``(ok, value)``: whether ``value`` fits ``hint``, and the value to use.

    The only conversions are the lossless ones a YAML user expects: an int where a float
    is wanted, and a number written as a string that YAML 1.1 does not read as a float
    (``1e-4`` loads as the string ``"1e-4"`` under ``yaml.safe_load``).
    """
    if hint is Any or hint is typing.Any or isinstance(hint, (str, typing.ForwardRef)):
        return True, value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        # Try the exact types first so that 3 stays an int for `int | float`.
        for arg in args:
            ok, out = coerce(value, arg)
            if ok and (type(out) is type(value) or value is None):
                return True, out
        for arg in args:
            ok, out = coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if hint is type(None) or hint is None:
        return value is None, value
    if origin is Literal:
        return value in typing.get_args(hint), value
    if origin in (list, typing.List, tuple, set):
        if not isinstance(value, list):
            return False, value
        args = typing.get_args(hint)
        if not args or origin is tuple:
            return True, value
        results = [coerce(v, args[0]) for v in value]
        return all(ok for ok, _ in results), [v for _, v in results]
    if origin in (dict, typing.Dict):
        return isinstance(value, dict), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, value  # an int is a valid float and prints as the user wrote it
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if hint is str:
        return isinstance(value, str), value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = {m.value for m in hint} | {m.name for m in hint}
        return value in allowed, value
    if isinstance(hint, type):
        # Rich objects (e.g. a torch.dtype) come from YAML as strings or dicts.
        return isinstance(value, (hint, str, dict)), value
    return True, value


def describe(hint: Any) -> str:
    """A short human name for a type hint, e.g. ``float``, ``int | None``, ``'a' | 'b'``."""
    if isinstance(hint, str):
        return hint
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " | ".join(describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(describe(a) for a in typing.get_args(hint))
        return f"{getattr(origin, '__name__', origin)}[{args}]"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    return getattr(hint, "__name__", str(hint))


def did_you_mean(key: str, choices: typing.Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` when a close match exists, else ``""``."""
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def shown(value: Any) -> str:
    """``repr(value)`` cut short: an error line names a value, it does not print a megabyte."""
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = 80
    return short.repr(value)
