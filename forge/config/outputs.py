"""Paths in a preset that forge writes to, and the rule for them: from a preset file, only
inside the run's output directory (a shared preset must not overwrite ``~/.bashrc``); from the
command line (``--set``), anywhere.

Example:
    >>> escapes("../victim.json"), escapes("summary.json")
    (True, False)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from forge.core.typecheck import shown

#: Where forge writes files a preset names (dotted keys of the resolved preset).
OUTPUT_PATHS = ("monitor.summary_file", "trackers.tensorboard.logging_dir",
                "trackers.mlflow.tracking_uri")
_REMOTE_MLFLOW = ("databricks", "databricks-uc", "uc")


def local_path(key: str, value: str) -> str | None:
    """The local file path an output-path value names (None: a remote tracking server)."""
    if key != "trackers.mlflow.tracking_uri":
        return value
    if value in _REMOTE_MLFLOW:
        return None
    scheme, sep, rest = value.partition(":")
    if not sep or len(scheme) == 1:  # no scheme (or a Windows drive letter): a path
        return value
    if scheme == "file":
        return rest[2:] if rest.startswith("//") else rest
    if scheme == "sqlite":
        return rest[3:] if rest.startswith("///") else None
    return None


def escapes(path: str) -> bool:
    """Whether a path leaves the directory it is relative to (absolute, ``~``, or ``..``)."""
    if path.startswith("~") or os.path.isabs(path):
        return True
    return os.path.normpath(path).split(os.sep)[0] == ".."


def output_path_problems(config: dict[str, Any], where: Callable[[str], str]) -> list[tuple[str, str]]:
    """``(key, problem)`` for each output path a preset file sets outside the output directory.

    Args:
        config: the validated preset sections.
        where: dotted key -> the file (or ``--set``) that set it.
    """
    problems = []
    for key in OUTPUT_PATHS:
        section, *rest = key.split(".")
        value = config.get(section)
        for part in rest:
            value = value.get(part) if isinstance(value, dict) else None
        path = local_path(key, value) if isinstance(value, str) else None
        if path is not None and escapes(path) and where(key) != "--set":
            problems.append((key, f"{shown(value)} is outside the output directory; a preset file "
                             "writes only inside it (give this path with --set to write elsewhere)"))
    return problems
