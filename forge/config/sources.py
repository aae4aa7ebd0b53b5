"""``data.sources``: several data sources mixed into one training set, each checked on its own.

A source is a mapping with its own ``path`` and, optionally, ``format``, ``split``,
``max_samples``, a mixing ``weight`` and a ``columns`` map; what a source leaves out it takes
from the ``data:`` section around it (``format``, ``split``, ``columns``). Problems name the
source by its index, ``data.sources[1].weight: ...``, before anything loads.

Example (YAML):
    data:
      sources:
        - {path: chats.jsonl, weight: 3}
        - {path: qa.csv, weight: 1, columns: {question: prompt, answer: completion}}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SourceConfig:
    """Each item of ``data.sources``: a file (or saved dataset, or Hub name) and how to mix it in."""

    path: str = field(metadata={"help": "A data file, saved dataset directory, Hub name or builtin:."})
    format: str | None = field(
        default=None, metadata={"help": "As data.format; null: data.format, else detected."})
    split: str | None = field(
        default=None, metadata={"help": "Split of a saved DatasetDict; null: data.split."})
    max_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N rows of this source."})
    weight: float = field(
        default=1.0, metadata={"help": "Mixing weight; the probability of drawing from this source "
                               "is its weight over the sum of the weights."})
    columns: dict[str, str] | None = field(
        default=None, metadata={"help": "Rename columns of this source, e.g. {question: prompt}; "
                                "null: data.columns."})


def check_sources(check: Any, sources: Any, formats: tuple[str, ...]) -> list[dict[str, Any]]:
    """Validate ``data.sources`` item by item with the schema's checker; return the coerced list.

    Args:
        check: the schema's problem collector (``fields``/``add``), see :mod:`forge.config.schema`.
        sources: the value of ``data.sources``.
        formats: the data format names allowed.
    """
    from forge.config.schema import _hints

    if not isinstance(sources, list) or not sources:
        check.add("data.sources", "expected a non-empty list of sources, each {path: ..., weight: ...}")
        return []
    hints = _hints(SourceConfig)
    out = []
    for i, item in enumerate(sources):
        key = f"data.sources[{i}]"
        if not isinstance(item, dict):
            check.add(key, f"expected a mapping with a path, got {item!r}")
            continue
        fields = check.fields(key, item, hints)
        if "path" not in item:
            check.add(f"{key}.path", "missing; every source needs its own path")
        fmt = fields.get("format")
        if fmt is not None and fmt not in formats:
            check.add(f"{key}.format", f"expected one of {', '.join(formats)}, got {fmt!r}")
        out.append(fields)
    return out


def resolve_sources(data: Any) -> list[SourceConfig]:
    """The sources a ``data:`` section describes, with the section's defaults filled in.

    Without ``sources`` this is the one source ``data.path`` names (weight 1), so the
    single-source form and a list of one read the same rows.
    """
    defaults = {"format": data.format, "split": data.split, "columns": data.columns}
    if not data.sources:
        return [SourceConfig(path=data.path, max_samples=data.max_samples, **defaults)]
    out = []
    for item in data.sources:
        values = {k: v for k, v in item.items() if v is not None}
        merged = {**defaults, **values}
        out.append(SourceConfig(**{f.name: merged[f.name] for f in dataclasses.fields(SourceConfig)
                                   if f.name in merged}))
    return out
