"""Read training data from local files into the dataset shapes TRL's trainers expect.

Supported files: ``.jsonl``, ``.json``, ``.csv``, ``.parquet``, or a directory written by
``datasets.Dataset.save_to_disk``. The format is detected from the columns (or named in
``data.format``):

=====================  ==========================================  =====================
format                 columns                                      becomes (for TRL)
=====================  ==========================================  =====================
``messages``           ``messages``: [{role, content}, ...]         conversational LM
``prompt_completion``  ``prompt``, ``completion``                   chat prompt/completion
``alpaca``             ``instruction``, optional ``input``, ``output``  chat prompt/completion
``text``               ``text``                                     plain LM
``preference`` (DPO)   ``prompt``, ``chosen``, ``rejected``         chat preference
=====================  ==========================================  =====================

Every row is checked; a missing or empty field is a :class:`~forge.errors.ForgeError` naming
the file, the row number (1-based, as an editor shows JSONL lines) and the field.

Example:
    >>> from forge.data import load_examples
    >>> ds = load_examples("train.jsonl", method="sft")     # a datasets.Dataset
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from forge.errors import ForgeError

REQUIRED = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
}
ROLES = ("system", "user", "assistant", "tool")


def resolve_data_path(path: str) -> Path:
    """``builtin:demo-sft`` or a filesystem path, checked to exist."""
    from forge.demo import BUILTIN_PREFIX, builtin_data_path

    if path.startswith(BUILTIN_PREFIX):
        return builtin_data_path(path[len(BUILTIN_PREFIX):])
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ForgeError(f"data file '{path}' not found")
    return resolved


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ForgeError(f"{path} row {lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ForgeError(f"{path} row {lineno}: expected a JSON object")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines saved with a .json name
            return _read_jsonl(path)
        raise ForgeError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ForgeError(f"{path}: expected a JSON list of objects (or JSON Lines)")
    return data


def read_rows(path: Path, split: str = "train") -> Any:
    """Read a data file or saved dataset directory into a ``datasets.Dataset``."""
    import datasets

    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise ForgeError(f"{path}: not a directory saved by datasets.save_to_disk") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ForgeError(f"{path}: no split '{split}' (has {', '.join(loaded)})")
            loaded = loaded[split]
        return loaded
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return datasets.Dataset.from_list(_read_jsonl(path))
    if suffix == ".json":
        return datasets.Dataset.from_list(_read_json(path))
    if suffix in (".csv", ".parquet"):
        builder = suffix[1:]
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # pyarrow/pandas parse errors: name the file, keep one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ForgeError(f"{path}: cannot read {builder.upper()} ({first})") from None
    raise ForgeError(f"{path}: unsupported data file type '{suffix}' "
                     "(use .jsonl, .json, .csv, .parquet or a saved dataset directory)")


def detect_format(columns: list[str], method: str) -> str:
    """The data format implied by a set of column names."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if "messages" in cols:
        return "messages"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    wanted = "prompt/chosen/rejected" if method == "dpo" else (
        "messages, prompt/completion, instruction/output or text")
    raise ForgeError(f"cannot tell the data format from the columns {sorted(cols)}; "
                     f"expected {wanted} (or set data.format)")


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list)) and len(value) == 0)


def _check_messages(where: str, field: str, value: Any) -> None:
    if not isinstance(value, list):
        raise ForgeError(f"{where}: field '{field}' must be a list of {{role, content}} messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ForgeError(f"{where}: {field}[{i}] must have 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise ForgeError(f"{where}: {field}[{i}] has unknown role {msg['role']!r} "
                             f"(expected one of {', '.join(ROLES)})")
        if _empty(msg["content"]):
            raise ForgeError(f"{where}: {field}[{i}] has empty 'content'")


def check_rows(ds: Any, fmt: str, source: str) -> None:
    """Raise a ForgeError naming the first row with a missing or empty required field."""
    required = REQUIRED[fmt]
    for n, row in enumerate(ds, 1):
        where = f"{source} row {n}"
        for field in required:
            if _empty(row.get(field)):
                raise ForgeError(f"{where}: field '{field}' is missing or empty")
            value = row[field]
            if fmt == "messages" or isinstance(value, list):
                _check_messages(where, field, value)
            elif not isinstance(value, str):
                raise ForgeError(f"{where}: field '{field}' must be text, "
                                 f"got {type(value).__name__}")
        if fmt == "messages" and not any(m["role"] == "assistant" for m in row["messages"]):
            raise ForgeError(f"{where}: field 'messages' has no assistant message to learn from")


def _as_turn(role: str, value: Any) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _to_trl(row: dict, fmt: str) -> dict:
    if fmt == "alpaca":
        extra = row.get("input") or ""
        prompt = f"{row['instruction']}\n\n{extra}" if extra else row["instruction"]
        return {"prompt": _as_turn("user", prompt), "completion": _as_turn("assistant", row["output"])}
    if fmt == "prompt_completion":
        return {"prompt": _as_turn("user", row["prompt"]),
                "completion": _as_turn("assistant", row["completion"])}
    if fmt == "preference":
        return {"prompt": _as_turn("user", row["prompt"]),
                "chosen": _as_turn("assistant", row["chosen"]),
                "rejected": _as_turn("assistant", row["rejected"])}
    return {REQUIRED[fmt][0]: row[REQUIRED[fmt][0]]}


def load_examples(
    path: str,
    method: str = "sft",
    fmt: str | None = None,
    split: str = "train",
    max_samples: int | None = None,
) -> Any:
    """Load, check and convert one data source into a ``datasets.Dataset`` for TRL.

    Args:
        path: a file, a saved dataset directory, or ``builtin:demo-sft`` / ``builtin:demo-dpo``.
        method: ``"sft"`` or ``"dpo"``; DPO needs the preference format and SFT cannot use it.
        fmt: a format name from the table above; None detects it from the columns.
        split: the split to read from a saved ``DatasetDict``.
        max_samples: keep only the first N rows.

    Raises:
        ForgeError: missing file, unknown format, a bad row (named by number), or no rows.
    """
    source = resolve_data_path(path)
    ds = read_rows(source, split)
    if len(ds) == 0:
        raise ForgeError(f"{source}: the data set is empty")
    fmt = fmt or detect_format(ds.column_names, method)
    if method == "dpo" and fmt != "preference":
        raise ForgeError(f"{source}: method dpo needs prompt/chosen/rejected columns, "
                         f"found format '{fmt}' (columns {sorted(ds.column_names)})")
    if method == "sft" and fmt == "preference":
        raise ForgeError(f"{source}: prompt/chosen/rejected data is for method dpo, not sft")
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    check_rows(ds, fmt, str(source))
    import datasets

    return datasets.Dataset.from_list([_to_trl(row, fmt) for row in ds])
