"""The checks for preference pairs, on ``DPOTrainer``'s own tokenisation and collator.

DPO trains on the difference between the chosen and the rejected completion, so besides the
loss mask, EOS and truncation it checks the pairs themselves: a pair whose two sides are the
same tokens (before or after ``max_length`` cuts them) has no difference to learn from.

Example:
    >>> checks = dpo_checks(prepare_dpo(rows, tokenizer, args), dpo_collator(tokenizer, args),
    ...                     tokenizer, stop_ids={tokenizer.eos_token_id}, max_length=1024)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from forge.doctor.mask import render_supervised
from forge.doctor.prepare import ROW, model_inputs
from forge.doctor.result import FAIL, OK, WARN, Check


def _rows(named: list[int]) -> str:
    return ", ".join(str(r) for r in named[:5]) + (" ..." if len(named) > 5 else "")


def _collated(row: dict[str, Any], collator: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> dict[str, Any]:
    """One pair as the trainer batches it: the chosen and rejected sequences, each cut to its length."""
    batch = collator([model_inputs(row)])
    out = {}
    for i, side in enumerate(("chosen", "rejected")):
        n = int(batch["attention_mask"][i].sum())
        out[side] = batch["input_ids"][i, :n].tolist()
        out[f"{side}_mask"] = batch["completion_mask"][i, :n].tolist()
    return out


def dpo_checks(prepared: Any, collator: Callable[[list[dict[str, Any]]], dict[str, Any]], tokenizer: Any,
               stop_ids: set[int], max_length: int | None) -> list[Check]:
    """The loss mask, EOS, truncation and pair checks for preference rows.

    Args:
        prepared: untruncated rows from :func:`~forge.doctor.prepare.prepare_dpo` (with the row index).
        collator: the collator training uses (it truncates to ``max_length``).
        tokenizer: decodes the example shown and names tokens.
        stop_ids: token ids that end a turn.
        max_length: the run's ``max_length`` (None: no truncation).
    """
    same, same_after_cut, empty, no_eos, cut, dropped = [], [], [], [], [], []
    fractions = []
    for n, row in enumerate(prepared, 1):
        r = row.get(ROW, n)
        seq = _collated(row, collator)
        if row["chosen_ids"] == row["rejected_ids"]:
            same.append(r)
        elif seq["chosen"] == seq["rejected"]:
            same_after_cut.append(r)
        sup = [sum(seq[f"{side}_mask"]) for side in ("chosen", "rejected")]
        fractions.append(sum(sup) / max(len(seq["chosen"]) + len(seq["rejected"]), 1))
        if min(sup) == 0:
            (dropped if max_length is not None and len(row["prompt_ids"]) >= max_length else empty).append(r)
        full = len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        if max_length is not None and full > max_length:
            cut.append(r)
        trained_stop = all(any(t in stop_ids and m for t, m in zip(seq[side], seq[f"{side}_mask"]))
                           for side in ("chosen", "rejected"))
        if not trained_stop:
            no_eos.append(r)
    total = len(fractions)
    first = prepared[0]
    shown = render_supervised(tokenizer, first["prompt_ids"] + first["chosen_ids"],
                              [False] * len(first["prompt_ids"]) + [True] * len(first["chosen_ids"]))
    details = [f"row {first.get(ROW, 1)}, chosen completion in [[...]]: {shown}"]
    checks = []
    if empty:
        checks.append(Check("loss mask", FAIL, f"{len(empty)} of {total} pairs have an empty chosen or rejected "
                            f"completion (rows {_rows(empty)}): they train nothing", details))
    else:
        checks.append(Check("loss mask", OK, f"every pair supervises both completions: {100 * min(fractions):.0f}"
                            f"-{100 * max(fractions):.0f}% of tokens", details, {"examples": total}))
    eos = repr(tokenizer.eos_token)
    if len(no_eos) == total:
        checks.append(Check("eos", FAIL, f"no pair supervises the end-of-turn token {eos}: the model never "
                            "learns to stop", data={"without_supervised_eos": len(no_eos)}))
    elif no_eos:
        checks.append(Check("eos", WARN, f"{len(no_eos)} of {total} pairs do not supervise {eos} on both sides "
                            f"(rows {_rows(no_eos)}; cut by max_length?)",
                            data={"without_supervised_eos": len(no_eos)}))
    else:
        checks.append(Check("eos", OK, f"the end-of-turn token {eos} is supervised in both completions of every pair"))
    if not cut:
        checks.append(Check("truncation", OK, f"no pair is longer than max_length={max_length}"))
    else:
        lost = f"; {len(dropped)} lose the whole response and TRL drops them (rows {_rows(dropped)})" if dropped else ""
        status = FAIL if len(dropped) == total else WARN
        checks.append(Check("truncation", status, f"{len(cut)} of {total} pairs are longer than "
                            f"max_length={max_length} and are cut (rows {_rows(cut)}){lost}",
                            data={"cut": len(cut), "whole_response_removed": len(dropped)}))
    identical = same + same_after_cut
    data = {"pairs": total, "chosen_equals_rejected": len(same), "equal_after_truncation": len(same_after_cut)}
    if not identical:
        checks.append(Check("pairs", OK, f"chosen and rejected differ in all {total} pairs", data=data))
    else:
        parts = []
        if same:
            parts.append(f"{len(same)} pairs have chosen == rejected (rows {_rows(same)})")
        if same_after_cut:
            parts.append(f"{len(same_after_cut)} pairs become identical once max_length={max_length} cuts them "
                         f"(rows {_rows(same_after_cut)})")
        status = FAIL if len(identical) == total else WARN
        checks.append(Check("pairs", status, f"{'; '.join(parts)}: they train nothing (the DPO loss is a constant "
                            "there); remove them", data=data))
    return checks
