"""The training and evaluation sets of a ``data:`` section: one source, or several mixed.

Each source is read and checked by :func:`forge.recipes.data.load_examples` (its own format,
split, ``max_samples`` and column map), then the sources are interleaved by
``datasets.interleave_datasets``, seeded by ``training.seed``, drawing from each with
probability ``weight / sum(weights)`` until ``data.stopping_strategy`` says stop. Chat rows in
``messages`` and ``prompt``/``completion`` shape mix as ``messages`` (the prompt turns, then the
completion turns).

Example:
    >>> preset = forge.load_preset("lora", {"data.sources": [
    ...     {"path": "chats.jsonl", "weight": 3}, {"path": "qa.csv", "weight": 1}]})
    >>> train_ds, eval_ds = load_datasets(preset.data, preset.method, seed=42)
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from forge.config.sources import SourceConfig, resolve_sources
from forge.core.console import note
from forge.errors import ForgeError
from forge.recipes.data import load_examples

_SOURCE = "__forge_source"  # a column that says where a mixed row came from, dropped after counting


def load_datasets(data: Any, method: str, seed: int) -> tuple[Any, Any]:
    """The training set and the evaluation set (or None) a ``data:`` section describes.

    Args:
        data: the preset's ``data:`` section (:class:`forge.config.schema.DataConfig`).
        method: the preset's method (decides which formats are accepted).
        seed: ``training.seed``: the mixing order and the ``eval_fraction`` split.
    """
    sources = resolve_sources(data)
    train_ds = _mix(data, method, seed, sources)
    eval_ds = None
    if data.eval_path:
        eval_ds = load_examples(data.eval_path, method, data.format, data.eval_split or data.split,
                                columns=data.columns)
    elif data.eval_split:
        import datasets

        parts = [_load(data, i, s, method, split=data.eval_split) for i, s in enumerate(sources)]
        eval_ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(
            _same_shape(parts, sources))
    elif data.eval_fraction:
        split = train_ds.train_test_split(test_size=data.eval_fraction, seed=seed)
        train_ds, eval_ds = split["train"], split["test"]
    return train_ds, eval_ds


def sample_rows(data: Any, method: str, cap: int) -> Any:
    """The first ``cap`` rows of each source (in one row shape), for checks that need a sample.

    Errors name the source as :func:`load_datasets` would.
    """
    import dataclasses

    import datasets

    sources = [dataclasses.replace(s, max_samples=min(cap, s.max_samples or cap)) for s in resolve_sources(data)]
    parts = [_load(data, i, s, method) for i, s in enumerate(sources)]
    if len(parts) == 1:
        return parts[0]
    return datasets.concatenate_datasets(_same_shape(parts, sources))


def _load(data: Any, index: int, source: SourceConfig, method: str, split: str | None = None) -> Any:
    try:
        return load_examples(source.path, method, source.format, split or source.split,
                             None if split else source.max_samples, columns=source.columns)
    except ForgeError as err:
        if not data.sources:
            raise
        raise ForgeError(f"data.sources[{index}]: {err}") from None


def _mix(data: Any, method: str, seed: int, sources: list[SourceConfig]) -> Any:
    import datasets

    parts = [_load(data, i, s, method) for i, s in enumerate(sources)]
    if not data.sources:
        return parts[0]
    parts = _same_shape(parts, sources)
    total = sum(s.weight for s in sources)
    tagged = [ds.add_column(_SOURCE, [i] * len(ds)) for i, ds in enumerate(parts)]
    try:
        mixed = datasets.interleave_datasets(tagged, probabilities=[s.weight / total for s in sources],
                                             seed=seed, stopping_strategy=data.stopping_strategy)
    except ValueError as err:  # features that cannot be aligned (e.g. messages with other keys)
        first = str(err).strip().splitlines()[0]
        raise ForgeError(f"data.sources: the sources' rows do not line up ({first})") from None
    if data.max_samples is not None:
        mixed = mixed.select(range(min(data.max_samples, len(mixed))))
    counts = Counter(mixed[_SOURCE])
    drawn = ", ".join(f"{counts.get(i, 0)} from {s.path}" for i, s in enumerate(sources))
    note(f"data: {len(sources)} sources mixed by weight ({data.stopping_strategy}, seed {seed}): "
         f"{len(mixed)} rows, {drawn}")
    return mixed.remove_columns(_SOURCE)


def _shape(ds: Any) -> str:
    cols = set(ds.column_names)
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols and "label" not in cols:
        return "prompt_completion"
    return "/".join(sorted(cols))


def _same_shape(parts: list[Any], sources: list[SourceConfig]) -> list[Any]:
    """The sources in one row shape: chat prompt/completion rows become ``messages`` when
    another source is in ``messages`` shape; anything else that differs is an error."""
    shapes = [_shape(ds) for ds in parts]
    if len(set(shapes)) == 1:
        return parts
    if set(shapes) == {"messages", "prompt_completion"}:
        note("data.sources: prompt/completion rows mix with messages rows as messages (the loss "
             "covers the whole chat; training.assistant_only_loss=true keeps it on the answers)")
        return [ds if shape == "messages" else ds.map(_as_messages, remove_columns=ds.column_names)
                for ds, shape in zip(parts, shapes)]
    first = shapes[0]
    other = next(i for i, shape in enumerate(shapes) if shape != first)
    raise ForgeError(f"data.sources[{other}]: rows of shape '{shapes[other]}' ({sources[other].path}) "
                     f"cannot be mixed with rows of shape '{first}' ({sources[0].path})")


def _as_messages(row: dict[str, Any]) -> dict[str, Any]:
    return {"messages": list(row["prompt"]) + list(row["completion"])}
