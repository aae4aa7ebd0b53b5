"""One check's verdict (:class:`Check`), the lines ``forge doctor`` prints, and ``doctor.json``.

Example:
    >>> check = Check("eos", WARN, "3 of 40 examples never supervise <|im_end|>")
    >>> format_line(check)
    'WARN  eos: 3 of 40 examples never supervise <|im_end|>'
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from forge.core.io import write_json
from forge.core.paths import DOCTOR_FILE

OK, WARN, FAIL = "OK", "WARN", "FAIL"
STATUSES = (OK, WARN, FAIL)


@dataclass
class Check:
    """The verdict of one pre-flight check.

    Attributes:
        name: the check, e.g. ``"loss mask"``.
        status: ``OK``, ``WARN`` or ``FAIL``.
        message: one line saying what was found (and, for WARN/FAIL, what to change).
        details: further lines shown under it (e.g. an example with its supervised span marked).
        data: the numbers behind the verdict, for ``doctor.json`` and tests.
    """

    name: str
    status: str
    message: str
    details: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


def format_line(check: Check) -> str:
    """``STATUS  name: message`` (statuses padded to one width, so a column of them lines up)."""
    return f"{check.status:<4}  {check.name}: {check.message}"


def format_checks(checks: Iterable[Check], details: bool = True) -> str:
    """Every check as its line, each followed by its detail lines, indented."""
    lines = []
    for check in checks:
        lines.append(format_line(check))
        if details:
            lines.extend(f"      {line}" for line in check.details)
    return "\n".join(lines)


def failures(checks: Iterable[Check]) -> list[Check]:
    """The checks that FAILed."""
    return [c for c in checks if c.status == FAIL]


def summary(checks: list[Check]) -> str:
    """``"7 OK, 1 WARN, 0 FAIL"``."""
    counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
    return ", ".join(f"{counts[s]} {s}" for s in STATUSES)


def write_checks(checks: list[Check], run_dir: str | Path) -> Path:
    """Write ``doctor.json`` into ``run_dir`` (what ``forge report`` shows); returns its path."""
    path = Path(run_dir) / DOCTOR_FILE
    write_json({"checks": [asdict(c) for c in checks], "summary": summary(checks)}, path)
    return path


def read_checks(run_dir: str | Path) -> list[Check] | None:
    """The checks a run recorded in ``doctor.json``, or None when it has none (or it is unreadable)."""
    path = Path(run_dir) / DOCTOR_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [Check(**c) for c in data["checks"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
