"""Duplicate and blank rows, and evaluation rows that also appear in training.

forge's data loader already refuses a missing or empty field; what passes it and still hurts
is a row repeated many times (it is weighted up, usually by a concatenation mistake), a text
that is only whitespace, and an evaluation row that is also a training row (the evaluation
loss then flatters the model).

Example:
    >>> check_rows(train_rows, eval_rows)
    [Check(name='duplicates', status='OK', ...), Check(name='blank rows', status='OK', ...)]
"""

from __future__ import annotations

import json
from typing import Any

from forge.doctor.result import OK, WARN, Check

DUPLICATE_WARN_FRACTION = 0.1  # repeats above this share of the rows are a WARN


def _key(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [m.get("content") for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return []


def _rows(named: list[int]) -> str:
    return ", ".join(str(r) for r in named[:5]) + (" ..." if len(named) > 5 else "")


def check_rows(rows: Any, eval_rows: Any = None) -> list[Check]:
    """Duplicates (and evaluation rows seen in training) and whitespace-only texts.

    Args:
        rows: the training rows (forge's converted rows, as the trainer receives them).
        eval_rows: the evaluation rows, or None.
    """
    seen: dict[str, int] = {}
    repeats: list[tuple[int, int]] = []
    blank: list[int] = []
    for n, row in enumerate(rows, 1):
        key = _key(row)
        if key in seen:
            repeats.append((n, seen[key]))
        else:
            seen[key] = n
        if any(not t.strip() for v in row.values() for t in _texts(v)):
            blank.append(n)
    total = len(seen) + len(repeats)
    share = len(repeats) / max(total, 1)
    data = {"rows": total, "repeated": len(repeats), "blank": len(blank)}
    if repeats:
        first = f"row {repeats[0][0]} repeats row {repeats[0][1]}"
        message = f"{len(repeats)} of {total} rows ({100 * share:.0f}%) repeat an earlier row ({first})"
    else:
        message = f"no repeated rows among {total}"
    status = WARN if share > DUPLICATE_WARN_FRACTION else OK
    if status == WARN:
        message += "; repeats weigh more in training: deduplicate unless that is intended"
    if eval_rows is not None:
        leaked = [n for n, row in enumerate(eval_rows, 1) if _key(row) in seen]
        data["eval_rows_in_training"] = len(leaked)
        if leaked:
            status = WARN
            message += (f"; {len(leaked)} of {len(eval_rows)} evaluation rows are also training rows "
                        f"(eval rows {_rows(leaked)}): the eval loss flatters the model")
    checks = [Check("duplicates", status, message, data=data)]
    if blank:
        checks.append(Check("blank rows", WARN, f"{len(blank)} rows have a text or message that is only "
                            f"whitespace (rows {_rows(blank)})", data=data))
    else:
        checks.append(Check("blank rows", OK, f"no whitespace-only text in {total} rows", data=data))
    return checks
