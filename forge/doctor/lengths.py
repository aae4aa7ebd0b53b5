"""Truncation and packing, judged on TRL's own prepared rows and the collator's batches.

* **truncation**: how many examples ``max_length`` cuts, and how many lose their whole
  response (TRL then drops them without a word).
* **packing**: examples packed into one row must not see each other: their position ids
  restart at each example and the attention mask transformers builds from them is
  block-diagonal, so each token attends only within its own example.

Example:
    >>> check_truncation(full_rows, trained_rows, max_length=1024, mode="keep_start")
    Check(name='truncation', status='OK', ...)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from forge.doctor.mask import supervised_count
from forge.doctor.prepare import ROW, model_inputs
from forge.doctor.result import FAIL, OK, WARN, Check


def _rows(named: list[int]) -> str:
    return ", ".join(str(r) for r in named[:5]) + (" ..." if len(named) > 5 else "")


def check_truncation(full: Any, trained: Any | None, max_length: int | None, mode: str = "keep_start",
                     packing_strategy: str | None = None) -> Check:
    """Examples longer than ``max_length``, and those whose whole response the cut removes.

    Args:
        full: untruncated prepared rows (with the row index column).
        trained: the rows as TRL prepares them for training (truncated; rows it dropped are
            missing), or None with packing (then the cut is computed from ``full``).
        max_length: the run's ``max_length`` (None: no truncation).
        mode: ``keep_start`` or ``keep_end`` (TRL's ``truncation_mode``).
        packing_strategy: TRL's strategy when packing, else None.
    """
    lengths = [len(r["input_ids"]) for r in full]
    longest = max(lengths) if lengths else 0
    data: dict[str, Any] = {"examples": len(lengths), "longest": longest, "max_length": max_length}
    if max_length is None:
        return Check("truncation", OK, f"no max_length: nothing is cut (longest example {longest} tokens)",
                     data=data)
    long = [r for r, n in zip(full, lengths) if n > max_length]
    data["cut"] = len(long)
    if not long:
        return Check("truncation", OK, f"no example is longer than max_length={max_length} "
                     f"(longest {longest} tokens)", data=data)
    if packing_strategy == "bfd_split":
        return Check("truncation", WARN, f"{len(long)} of {len(lengths)} examples are longer than "
                     f"max_length={max_length} (longest {longest}); bfd_split packing splits them, so their "
                     "later parts train without the start of the conversation", data=data)
    if trained is not None:
        kept = {r[ROW] for r in trained}
        lost = [r[ROW] for r in long if r[ROW] not in kept]
    else:  # packing truncates each example to max_length, keeping its start
        keep = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
        lost = [r[ROW] for r in long if supervised_count(r["labels"][keep]) == 0]
    data["whole_response_removed"] = len(lost)
    share = f"{len(long)} of {len(lengths)} examples ({100 * len(long) / len(lengths):.0f}%)"
    end = "end" if mode == "keep_start" else "start"
    message = (f"{share} are longer than max_length={max_length} (longest {longest} tokens) and lose their "
               f"{end} (rows {_rows([r[ROW] for r in long])})")
    if lost:
        message += f"; {len(lost)} of them lose the whole response and TRL drops them (rows {_rows(lost)})"
    if len(lost) == len(lengths):
        return Check("truncation", FAIL, message + ": nothing is left to train on; raise data.max_length",
                     data=data)
    return Check("truncation", WARN, message + "; raise data.max_length or shorten them", data=data)


def _mask_of(config: Any, batch: dict[str, Any]) -> Any:
    """Which tokens each token may attend to, as the model's attention will: a bool
    ``[batch, query, key]`` tensor, or None when the kernel takes position ids directly."""
    import torch
    from transformers.masking_utils import create_causal_mask

    ids = batch["input_ids"]
    config = copy.copy(config.get_text_config() if hasattr(config, "get_text_config") else config)
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if "flash" in impl:
        return None  # varlen kernels split the row at every position-id restart
    config._attn_implementation = "sdpa"  # a boolean mask, whatever the kernel: the same visibility
    embeds = torch.zeros(ids.shape[0], ids.shape[1], 1)
    mask = create_causal_mask(config, embeds, batch.get("attention_mask"), None,
                              position_ids=batch.get("position_ids"), allow_is_causal_skip=False)
    return mask[:, 0].bool()


def check_packing(packed: Any, collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
                  model_config: Any, strategy: str = "bfd", sample: int = 4) -> Check:
    """Packed examples keep apart: position ids restart at each, and attention stays within it.

    Args:
        packed: rows packed by TRL (``seq_lengths`` per row).
        collator: the collator training uses.
        model_config: the model's config (its attention implementation builds the mask), or None.
        strategy: TRL's ``packing_strategy``.
        sample: packed rows to check.
    """
    import torch

    shared = [r for r in packed if len(r.get("seq_lengths") or []) > 1][:sample]
    if not shared:
        return Check("packing", OK, "packing is on, but no two examples share a row (each fills max_length)")
    batch = collator([model_inputs(r) for r in shared])
    owner = torch.cat([torch.repeat_interleave(torch.arange(len(r["seq_lengths"])) + 1000 * i,
                                               torch.tensor(r["seq_lengths"])) for i, r in enumerate(shared)])
    n_examples = sum(len(r["seq_lengths"]) for r in shared)
    data = {"rows": len(shared), "examples": n_examples, "strategy": strategy}
    flat = "position_ids" in batch and "attention_mask" not in batch
    if flat:
        owner = owner[None, :]
    else:  # one packed row per batch row, padded
        width = batch["input_ids"].shape[1]
        owner = torch.stack([torch.nn.functional.pad(o, (0, width - len(o)), value=-1)
                             for o in torch.split(owner, [sum(r["seq_lengths"]) for r in shared])])
    problems = []
    if "position_ids" in batch:
        starts = torch.cat([torch.ones(1, dtype=torch.bool), owner[0, 1:] != owner[0, :-1]]) if flat else None
        restart = batch["position_ids"][0] == 0 if flat else None
        if flat and not bool((starts == restart[: len(starts)]).all()):
            problems.append("position ids do not restart at each example")
    try:
        visible = _mask_of(model_config, batch) if model_config is not None else None
    except Exception as err:  # a model family whose masks cannot be built from its config alone
        visible = None
        data["mask_error"] = str(err).splitlines()[0] if str(err) else type(err).__name__
    if visible is None and "position_ids" not in batch:
        problems.append("no position ids: the kernel cannot tell the examples apart")
    if visible is not None:
        same = owner[:, :, None] == owner[:, None, :]
        real = (owner >= 0)[:, :, None] & (owner >= 0)[:, None, :]
        leaks = int((visible & real & ~same).sum())
        data["cross_example_pairs"] = leaks
        if leaks:
            problems.append(f"{leaks} token pairs attend across examples")
    if problems:
        status = WARN if strategy == "wrapped" else FAIL
        return Check("packing", status, f"packed examples see each other: {'; '.join(problems)} "
                     f"({n_examples} examples in {len(shared)} rows, strategy {strategy}); use "
                     "packing_strategy bfd with TRL's collator, or set data.packing: false", data=data)
    how = ("the attention mask transformers builds from them is per example" if visible is not None
           else "the varlen kernel splits the row there")
    return Check("packing", OK, f"position ids restart at each of {n_examples} packed examples in "
                 f"{len(shared)} rows and {how}", data=data)
