"""Rows read from JSON and JSON Lines files within bounds, and type-checked before pyarrow.

Only so much is read at once (:data:`MAX_ROW_BYTES` per line, :data:`MAX_JSON_BYTES` per
``.json`` file, also after ``.gz`` decompression), every line is decoded as UTF-8 on its own
(so an error names the row), and each field must have one type in every row
(:func:`check_field_types`) before ``datasets.Dataset.from_list`` builds a table.

Example:
    >>> ds = from_rows(read_jsonl(Path("train.jsonl")), "train.jsonl")
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

from forge.errors import ForgeError

# Bounds on what one read takes in: a row is tokenised whole before truncation, so a 50 MB line
# would cost ~10 GB; 4 MB of text is ~1M tokens, far past any max_length.
MAX_ROW_BYTES = 4 * 2**20
MAX_JSON_BYTES = 2**30  # a .json file is parsed whole; JSON Lines stream


def _open_binary(path: Path):
    """Open a data file for reading bytes; ``.gz`` files are decompressed on the fly."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ForgeError(f"{where}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None


def _lines(path: Path):
    """``(line number, text)`` of each line, each at most :data:`MAX_ROW_BYTES` long."""
    try:
        with _open_binary(path) as f:
            lineno = 0
            while raw := f.readline(MAX_ROW_BYTES + 1):
                lineno += 1
                if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
                    raise ForgeError(f"{path} row {lineno}: longer than {MAX_ROW_BYTES // 2**20} MB, "
                                     "more than forge reads as one row; split the document")
                text = _decode(raw, f"{path} row {lineno}")
                yield lineno, text.lstrip("\ufeff") if lineno == 1 else text
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ForgeError(f"{path}: not a valid gzip file ({err})") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ForgeError(f"{path} row {lineno}: invalid JSON ({err.msg})") from None
        except RecursionError:
            raise ForgeError(f"{path} row {lineno}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise ForgeError(f"{path} row {lineno}: expected a JSON object")
        rows.append(row)
    return rows


def read_json(path: Path) -> list[dict]:
    try:
        with _open_binary(path) as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ForgeError(f"{path}: not a valid gzip file ({err})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise ForgeError(f"{path}: more than {MAX_JSON_BYTES // 2**30} GB of JSON, which is read "
                         "whole; save it as JSON Lines (.jsonl), which forge reads row by row")
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ForgeError(f"{path}: line {line}: not UTF-8 text; save the file as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines saved with a .json name
            return read_jsonl(path)
        raise ForgeError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from None
    except RecursionError:
        raise ForgeError(f"{path}: JSON nested too deeply") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ForgeError(f"{path}: expected a JSON list of objects (or JSON Lines)")
    return data


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object"


def check_field_types(rows: list[dict], source: Any) -> None:
    """Each field (nested ones too) has one type in every row, as a table column must.

    pyarrow would refuse such rows in ``Dataset.from_list`` with a message naming neither
    the file, the row nor the field; this names all three.

    Raises:
        ForgeError: e.g. ``d.jsonl row 7: field 'prompt' is a list, but text in row 1``.
    """
    first: dict[str, tuple[str, int]] = {}
    for n, row in enumerate(rows, 1):
        stack = [(str(k), str(k), v) for k, v in reversed(row.items())]  # popped in file order
        while stack:
            shown, key, value = stack.pop()
            kind = _kind(value)
            if kind is None:
                continue
            if kind == "a number" and isinstance(value, int) and not -2**63 <= value < 2**63:
                raise ForgeError(f"{source} row {n}: field '{shown}' is a number too large for a "
                                 "64-bit integer")
            seen_kind, seen_row = first.setdefault(key, (kind, n))
            if seen_kind != kind:
                raise ForgeError(f"{source} row {n}: field '{shown}' is {kind}, but {seen_kind} in "
                                 f"row {seen_row} (a field must have one type in every row)")
            if isinstance(value, list):
                stack.extend((f"{shown}[{i}]", f"{key}[]", v) for i, v in reversed(list(enumerate(value))))
            elif isinstance(value, dict):
                stack.extend((f"{shown}.{k}", f"{key}.{k}", v) for k, v in reversed(value.items()))


def from_rows(rows: list[dict], source: Any) -> Any:
    import datasets

    check_field_types(rows, source)
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as err:  # pyarrow: anything the type check above did not foresee
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ForgeError(f"{source}: cannot make a table of these rows ({first})") from None
