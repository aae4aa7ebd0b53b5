"""What a feature's phase hook returns: keyword arguments for the trainer, and under
:data:`ARGS` the training-argument fields it needs changed. Hooks never change the
``TrainingArguments`` themselves: the runner applies every section's changes, and refuses two
sections that want the same field to be different things.

Example:
    >>> from types import SimpleNamespace
    >>> args = SimpleNamespace(remove_unused_columns=True)
    >>> kwargs = apply_arg_updates(args, {"data_collator": "c", ARGS: {"remove_unused_columns": False}})
    >>> kwargs, args.remove_unused_columns
    ({'data_collator': 'c'}, False)
"""

from __future__ import annotations

from typing import Any

#: The key of a hook's result that holds training-argument changes.
ARGS = "args"


def apply_arg_updates(training_args: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """Set the fields under ``extra["args"]`` on ``training_args``; return the rest of ``extra``."""
    rest = dict(extra)
    for name, value in (rest.pop(ARGS, None) or {}).items():
        setattr(training_args, name, value)
    return rest
