"""Writing files the way every forge feature should: JSON that other tools read, and no
half-written file after a crash (write to a temporary name in the same folder, then rename)."""

from __future__ import annotations

import json
import math
import os
from typing import Any


def json_safe(obj: Any) -> Any:
    """Strict JSON: NaN and infinities become null (plotting tools read them as gaps).

    Example:
        >>> json_safe({"a": [1.0, float("nan")]})
        {'a': [1.0, None]}
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(obj: Any, path: str | os.PathLike, strict: bool = True) -> None:
    """Write ``obj`` as JSON, atomically.

    ``strict`` writes NaN as null for other tools; state files keep NaN so they round-trip.
    """
    if strict:
        text = json.dumps(json_safe(obj), indent=1, allow_nan=False)
    else:
        text = json.dumps(obj, separators=(",", ":"))  # checkpoint state: compact
    atomic_write_text(path, text)
