"""Inputs of :mod:`forge.autotune`: the memory budget and the sequence length the run will meet.

``parse_memory("20GB")`` reads sizes as accelerate's ``max_memory`` does (GB = 10**9 bytes,
GiB = 2**30); ``"90%"`` is a share of the accelerator's total memory.

``sequence_length`` reads the tokens per row from the training data: already tokenised rows
(``input_ids``, or DPO's ``prompt_input_ids``/``chosen_input_ids``/``rejected_input_ids``), or
forge's conversational rows (``messages``, ``prompt``/``completion``, ``prompt``/``chosen``/
``rejected``, ``text``) tokenised with the tokenizer's chat template. The longest row (or a
percentile) is the worst case a padded batch can meet; with packing every row is
``max_length`` long.
"""

from __future__ import annotations

import math
import re
from typing import Any

from forge.errors import ForgeError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value: float | str, total: int | None = None) -> int:
    """A memory size in bytes from ``"20GB"``, ``"16GiB"``, ``"512MB"``, ``"90%"`` or a number.

    Args:
        value: the size; a bare number is bytes.
        total: the device's total bytes, needed for a percentage.

    Raises:
        ForgeError: the text is not a size, or a percentage without a known total.

    Example:
        >>> parse_memory("20GB"), parse_memory("1GiB"), parse_memory("50%", total=1000)
        (20000000000, 1073741824, 500)
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    text = str(value).strip().lower().replace(" ", "")
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise ForgeError(f"max_memory {value!r}: a percentage must be in (0, 100]")
        if total is None:
            raise ForgeError(f"max_memory {value!r}: a percentage needs an accelerator; "
                             "give a size such as 8GB")
        return int(total * share)
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([a-z]*)", text)
    if not match or match.group(2) not in UNITS:
        raise ForgeError(f"max_memory {value!r}: expected a size such as 20GB, 16GiB, 512MB or 90%")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def format_bytes(n: float | None) -> str:
    """``1.5e9`` -> ``"1.50 GB"`` (decimal units, as ``parse_memory`` reads them back)."""
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _token_count(tokenizer: Any, row: dict[str, Any]) -> int:
    def chat(messages: list[dict]) -> int:
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return len(ids)

    def turns(value: Any, role: str) -> list[dict]:
        return value if isinstance(value, list) else [{"role": role, "content": value}]

    if "messages" in row:
        return chat(row["messages"])
    if "chosen" in row:
        prompt = turns(row.get("prompt") or [], "user")
        return max(chat(prompt + turns(row["chosen"], "assistant")),
                   chat(prompt + turns(row["rejected"], "assistant")))
    if "completion" in row:
        return chat(turns(row["prompt"], "user") + turns(row["completion"], "assistant"))
    if "text" in row:
        return len(tokenizer(row["text"])["input_ids"])
    raise ForgeError(f"autotune: cannot tell the length of a row with columns {sorted(row)}; "
                     "set autotune.seq_len")


def row_length(row: Any, tokenizer: Any = None) -> int:
    """Tokens in one training row (the longer of chosen/rejected for preference rows)."""
    if isinstance(row, dict):
        if "input_ids" in row:
            return len(row["input_ids"])
        if "chosen_input_ids" in row:
            return len(row.get("prompt_input_ids") or []) + max(
                len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))
        if tokenizer is not None:
            return _token_count(tokenizer, row)
    raise ForgeError("autotune: the data is not tokenised and no tokenizer was given; "
                     "pass seq_len (autotune.seq_len in a preset) or a tokenizer")


def is_preference(dataset: Any) -> bool:
    """Whether rows hold a chosen and a rejected answer (DPO: two sequences per example)."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        try:
            columns = list(dataset[0])
        except (IndexError, KeyError, TypeError):
            return False
    return bool({"chosen", "chosen_input_ids"} & set(columns))


def sequence_length(
    dataset: Any,
    tokenizer: Any = None,
    *,
    percentile: float = 100.0,
    max_length: int | None = None,
    packing: bool = False,
    max_rows: int = 20_000,
) -> int:
    """Tokens per row of the worst batch the run will meet.

    Args:
        dataset: a ``datasets.Dataset`` or a list of dict rows (tokenised or conversational).
        tokenizer: needed when the rows are not tokenised yet.
        percentile: 100 takes the longest row; lower values ignore rare long outliers (a
            batch that meets one may then run out of memory).
        max_length: the run's truncation length; lengths are capped at it.
        packing: every packed row is ``max_length`` tokens.
        max_rows: read at most this many rows, evenly spaced over the data set.

    Returns:
        The sequence length for the probes.

    Raises:
        ForgeError: the data is empty or cannot be measured.

    Example:
        >>> sequence_length([{"input_ids": [1] * 10}, {"input_ids": [1] * 30}])
        30
    """
    if packing and max_length:
        return int(max_length)
    try:
        n = len(dataset)
    except TypeError:  # a streaming (iterable) data set
        raise ForgeError("autotune: cannot measure lengths of a streaming data set; pass seq_len") from None
    if n == 0:
        raise ForgeError("autotune: the training data is empty")
    step = max(1, n // max_rows)
    lengths = sorted(row_length(dataset[i], tokenizer) for i in range(0, n, step))
    rank = max(0, math.ceil(percentile / 100 * len(lengths)) - 1)
    length = lengths[min(rank, len(lengths) - 1)]
    return max(1, min(length, max_length) if max_length else length)
