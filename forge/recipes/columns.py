"""A column map: files whose columns have other names are renamed before the format is detected.

Example:
    >>> ds = rename_columns(ds, {"question": "prompt", "answer": "completion"}, "qa.csv")
    >>> detect_format(ds.column_names, "sft")
    'prompt_completion'
"""

from __future__ import annotations

from typing import Any

from forge.errors import ForgeError


def rename_columns(ds: Any, columns: dict[str, str], source: str) -> Any:
    """``ds`` with its columns renamed by ``columns`` (old name -> new name).

    Raises:
        ForgeError: a column to rename is not there, or a new name is taken by a column that
            stays, naming the source and the columns it has.
    """
    have = list(ds.column_names)
    for old, new in columns.items():
        if old not in have:
            raise ForgeError(f"{source}: columns: no column '{old}' to rename to '{new}' "
                             f"(has {', '.join(sorted(have))})")
        if new in have and new not in columns:
            raise ForgeError(f"{source}: columns: cannot rename '{old}' to '{new}': the file "
                             f"already has a '{new}' column")
    if len(set(columns.values())) != len(columns):
        raise ForgeError(f"{source}: columns: two columns renamed to the same name ({columns})")
    return ds.rename_columns(dict(columns))
