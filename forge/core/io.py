"""Writing files the way every forge feature should: JSON that other tools read, and no
half-written file after a crash (write to a temporary name in the same folder, then rename),
and a full disk said in plain words (:func:`is_disk_full`, :func:`disk_full`)."""

from __future__ import annotations

import errno
import json
import math
import os
from typing import Any

from forge.errors import ForgeFault

# How a full disk shows through the libraries that write checkpoints: torch.save's C++ stream
# ("basic_ios::clear: iostream error"), its zip writer, safetensors' Rust I/O error.
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "iostream error",
                   "file write failed", "os error 28", "os error 122")


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A kill or a full disk leaves either the old file or the new one, never half of one (and
    a symlink at ``path`` is replaced, not written through).

    Raises:
        ForgeFault: the disk is full (see :func:`disk_full`).

    Example:
        >>> atomic_write_bytes("out/plot.png", png)  # doctest: +SKIP
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not reach the disk before the data
        os.replace(tmp, path)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(path) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`atomic_write_bytes` does."""
    atomic_write_bytes(path, text.encode("utf-8"))


def is_disk_full(err: BaseException) -> bool:
    """Whether an exception from a write means the disk (or the user's quota) is full.

    Example:
        >>> is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . basic_ios::clear: iostream error"))
        True
    """
    seen = 0
    while err is not None and seen < 10:  # torch's zip writer raises again while closing
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(fragment in str(err).lower() for fragment in _DISK_FULL_TEXT):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def disk_full(path: str | os.PathLike, advice: str | None = None) -> ForgeFault:
    """The error for a full disk: it names the path, and says what to do next."""
    advice = advice or "free some space (or choose another --output-dir) and run again"
    return ForgeFault(f"disk full at {os.fspath(path)}; {advice}")


def write_json(obj: Any, path: str | os.PathLike, strict: bool = True) -> None:
    """Write ``obj`` as JSON, atomically.

    ``strict`` writes NaN as null for other tools; state files keep NaN so they round-trip.
    """
    if strict:
        text = json.dumps(json_safe(obj), indent=1, allow_nan=False)
    else:
        text = json.dumps(obj, separators=(",", ":"))  # checkpoint state: compact
    atomic_write_text(path, text)
