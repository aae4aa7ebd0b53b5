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
``unpaired_preference``  ``prompt``, ``completion``, ``label``     chat unpaired (KTO)
=====================  ==========================================  =====================

Which formats a method trains on is its ``data`` kind in :mod:`forge.config.methods` (KTO also
takes chosen/rejected pairs, unpaired by TRL's ``unpair_preference_dataset``). A column map
(``columns={"question": "prompt"}``) renames columns before the format is detected.

Every row is checked; a missing or empty field is a :class:`~forge.errors.ForgeError` naming
the file, the row number (1-based, as an editor shows JSONL lines) and the field.

Example:
    >>> from forge.recipes.data import load_examples
    >>> ds = load_examples("train.jsonl", method="sft")     # a datasets.Dataset
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from forge.errors import ForgeError
from forge.recipes.rows import MAX_ROW_BYTES, from_rows, read_json, read_jsonl

REQUIRED = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    # chosen/rejected that each hold the whole dialogue, prompt included (HH-RLHF's own shape);
    # the prompt is their common beginning, as TRL's extract_prompt takes it.
    "implicit_preference": ("chosen", "rejected"),
    # KTO's unpaired shape: one completion per row and whether it is a good one.
    "unpaired_preference": ("prompt", "completion", "label"),
}
PREFERENCE_FORMATS = ("preference", "implicit_preference")
# The formats each kind of method (forge.config.methods.Method.data) trains on.
FORMATS_BY_KIND = {
    "lm": ("messages", "prompt_completion", "alpaca", "text"),
    "preference": PREFERENCE_FORMATS,
    "unpaired": ("unpaired_preference", *PREFERENCE_FORMATS),
}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
ROLES = ("system", "user", "assistant", "tool")


# `owner/name` (and `owner/name:config`), as on the Hugging Face Hub.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?$")


def is_hub_name(path: str) -> bool:
    """Whether ``path`` names a Hub dataset (``owner/name``) rather than a local file."""
    return bool(_HUB_NAME.match(path)) and not Path(path).expanduser().exists() \
        and not path.endswith(DATA_SUFFIXES)


def resolve_data_path(path: str) -> Path:
    """``builtin:demo-sft`` or a filesystem path, checked to exist."""
    from forge.demo import BUILTIN_PREFIX, builtin_data_path

    if path.startswith(BUILTIN_PREFIX):
        return builtin_data_path(path[len(BUILTIN_PREFIX):])
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ForgeError(f"data file '{path}' not found")
    if not (resolved.is_file() or resolved.is_dir()):  # a FIFO would block, /dev/zero never ends
        raise ForgeError(f"data '{path}' is not a regular file (a pipe or a device?); give a "
                         "data file or a saved dataset directory")
    return resolved


def read_hub(name: str, split: str) -> Any:
    """A Hub dataset through ``datasets.load_dataset``; offline, only what the cache holds."""
    import datasets

    repo, _, config = name.partition(":")
    offline = any(os.environ.get(v, "").upper() in ("1", "TRUE", "YES", "ON")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    try:
        return datasets.load_dataset(repo, config or None, split=split)
    except Exception as err:  # network, missing split, no such dataset: one line, named
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = " (offline: HF_HUB_OFFLINE is set and the dataset is not in the cache)" if offline else ""
        raise ForgeError(f"data '{name}': not a local file, and the Hub dataset could not be "
                         f"loaded{hint}: {first}") from None


def read_rows(path: Path, split: str = "train") -> Any:
    """Read a data file or saved dataset directory into a ``datasets.Dataset``."""
    import datasets

    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise ForgeError(f"{path}: not a directory saved by datasets.save_to_disk") from None
        except Exception as err:  # a corrupt arrow file or dataset_info.json
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ForgeError(f"{path}: cannot read the saved dataset ({first})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ForgeError(f"{path}: no split '{split}' (has {', '.join(loaded)})")
            loaded = loaded[split]
        return loaded
    suffix = data_suffix(path)
    if suffix == ".jsonl":
        return from_rows(read_jsonl(path), path)
    if suffix == ".json":
        return from_rows(read_json(path), path)
    if suffix in (".csv", ".parquet"):
        builder = suffix[1:]
        quiet = not datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a table of one file: no "Generating train split" bar
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # pyarrow/pandas parse errors: name the file, keep one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ForgeError(f"{path}: cannot read {builder.upper()} ({first})") from None
        finally:
            if not quiet:
                datasets.enable_progress_bars()
    raise ForgeError(f"{path}: unsupported data file type '{suffix}' (use .jsonl, .json, .csv, "
                     ".parquet, their .gz, a saved dataset directory or a Hub dataset name)")


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".json.gz", ".csv.gz")


def data_suffix(path: Path) -> str:
    """The data type of a file: ``.jsonl`` for both ``x.jsonl`` and ``x.jsonl.gz``."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def detect_format(columns: list[str], method: str) -> str:
    """The data format implied by a set of column names."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "preference" if "prompt" in cols else "implicit_preference"
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion", "label"} <= cols and _kind(method) == "unpaired":
        return "unpaired_preference"  # for SFT a `label` column stays an extra column, as before
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    wanted = {"lm": "messages, prompt/completion, instruction/output or text",
              "preference": "prompt/chosen/rejected",
              "unpaired": "prompt/completion/label or prompt/chosen/rejected"}[_kind(method)]
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


def _text_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_bytes(m.get("content") if isinstance(m, dict) else m) for m in value)
    return 0


def check_rows(ds: Any, fmt: str, source: str) -> None:
    """Raise a ForgeError naming the first row with a missing or empty required field."""
    required = REQUIRED[fmt]
    for n, row in enumerate(ds, 1):
        where = f"{source} row {n}"
        if sum(_text_bytes(row.get(field)) for field in required) > MAX_ROW_BYTES:
            raise ForgeError(f"{where}: more than {MAX_ROW_BYTES // 2**20} MB of text, more than "
                             "forge reads as one row; split the document")
        for field in required:
            if _empty(row.get(field)):
                raise ForgeError(f"{where}: field '{field}' is missing or empty")
            value = row[field]
            if field == "label" and fmt == "unpaired_preference":
                if not isinstance(value, bool) and value not in (0, 1):
                    raise ForgeError(f"{where}: field 'label' must be true or false, got {value!r}")
                continue
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
    if fmt == "implicit_preference":
        return split_implicit_prompt(row["chosen"], row["rejected"])
    if fmt == "unpaired_preference":
        return {"prompt": _as_turn("user", row["prompt"]),
                "completion": _as_turn("assistant", row["completion"]), "label": bool(row["label"])}
    return {REQUIRED[fmt][0]: row[REQUIRED[fmt][0]]}


def hh_messages(text: str) -> list[dict] | None:
    """HH-RLHF's ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` as chat messages (None if not that shape).

    Example:
        >>> hh_messages("\\n\\nHuman: hi\\n\\nAssistant: hello")
        [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]
    """
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2])]


def split_implicit_prompt(chosen: Any, rejected: Any) -> dict[str, Any]:
    """``{prompt, chosen, rejected}`` from two whole dialogues that share their beginning.

    HH-RLHF text becomes chat messages first (so the tokenizer's chat template formats it);
    the shared beginning is found by TRL's own ``extract_prompt``.
    """
    from trl.data_utils import extract_prompt

    if isinstance(chosen, str) and isinstance(rejected, str):
        as_chat = hh_messages(chosen), hh_messages(rejected)
        if as_chat[0] and as_chat[1]:
            chosen, rejected = as_chat
    return extract_prompt({"chosen": chosen, "rejected": rejected})


def load_examples(
    path: str,
    method: str = "sft",
    fmt: str | None = None,
    split: str = "train",
    max_samples: int | None = None,
    columns: dict[str, str] | None = None,
) -> Any:
    """Load, check and convert one data source into a ``datasets.Dataset`` for TRL.

    Args:
        path: a file, a saved dataset directory, or ``builtin:demo-sft`` / ``builtin:demo-dpo``.
        method: a method of :mod:`forge.config.methods` (``"sft"``, ``"dpo"``, ``"kto"``, ...);
            its data kind decides which formats it takes.
        fmt: a format name from the table above; None detects it from the columns.
        split: the split to read from a saved ``DatasetDict``.
        max_samples: keep only the first N rows.
        columns: rename columns first, ``{"question": "prompt", "answer": "completion"}``.

    Raises:
        ForgeError: missing file, unknown format, a bad row (named by number), or no rows.
    """
    if is_hub_name(path):
        source: Any = path
        ds = read_hub(path, split)
    else:
        source = resolve_data_path(path)
        ds = read_rows(source, split)
    if len(ds) == 0:
        raise ForgeError(f"{source}: the data set is empty")
    if columns:
        from forge.recipes.columns import rename_columns

        ds = rename_columns(ds, columns, str(source))
    fmt = fmt or detect_format(ds.column_names, method)
    _check_method_takes(method, fmt, str(source), ds.column_names)
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    check_rows(ds, fmt, str(source))
    import datasets

    rows = []
    for n, row in enumerate(ds, 1):
        converted = _to_trl(row, fmt)
        if fmt == "implicit_preference" and (_empty(converted["prompt"]) or _empty(converted["chosen"])):
            raise ForgeError(f"{source} row {n}: chosen and rejected share no prompt (or one "
                             "contains the other); give a prompt column")
        rows.append(converted)
    out = datasets.Dataset.from_list(rows)
    if _kind(method) == "unpaired" and fmt in PREFERENCE_FORMATS:
        from trl.data_utils import unpair_preference_dataset

        out = unpair_preference_dataset(out)  # each pair: a good row and a bad row
    return out


def _kind(method: str) -> str:
    from forge.config.methods import METHOD_TABLE

    return METHOD_TABLE[method].data if method in METHOD_TABLE else "lm"


def _check_method_takes(method: str, fmt: str, source: str, columns: list[str]) -> None:
    """A format the method cannot train on is one line naming the file, method and columns."""
    kind = _kind(method)
    if fmt in FORMATS_BY_KIND[kind]:
        return
    if kind == "lm":
        if fmt == "unpaired_preference":
            raise ForgeError(f"{source}: prompt/completion/label data is for method kto, not {method}")
        raise ForgeError(f"{source}: chosen/rejected data is for method dpo, not {method} "
                         "(or orpo, cpo, kto)")
    wanted = "prompt/chosen/rejected (or chosen/rejected)" + (
        " or prompt/completion/label" if kind == "unpaired" else "")
    raise ForgeError(f"{source}: method {method} needs {wanted} columns, found format '{fmt}' "
                     f"(columns {sorted(columns)})")
