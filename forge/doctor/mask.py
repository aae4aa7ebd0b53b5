"""The loss mask and the end-of-turn token, judged on the rows and batches training will see.

* **loss mask**: the fraction of each example's tokens that are supervised (labels other than
  -100). An example with none trains nothing; with assistant-only loss on, a chat template
  without ``{% generation %}`` markers masks everything.
* **eos**: the end-of-turn token must be supervised, or the model never learns to stop. The
  classic way to lose it: pad == EOS and a collator that masks the pad id, which masks every
  EOS too. Judged on batches from the collator, so that collator is what is checked.

Example:
    >>> check_loss_mask(rows, tokenizer, policy="assistant turns")
    Check(name='loss mask', status='OK', ...)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from forge.doctor.prepare import ROW, model_inputs
from forge.doctor.result import FAIL, OK, WARN, Check

IGNORE = -100
RENDER_LIMIT = 600  # characters of the rendered example


def supervised_count(labels: Sequence[int]) -> int:
    """Tokens the loss sees."""
    return sum(1 for label in labels if label != IGNORE)


def render_supervised(tokenizer: Any, input_ids: Sequence[int], supervised: Sequence[bool],
                      mark: tuple[str, str] = ("[[", "]]")) -> str:
    """An example as text with each supervised span between ``[[`` and ``]]`` (newlines as ``\\n``).

    Example:
        >>> render_supervised(tok, ids, [False, False, True, True])
        '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n[[hello<|im_end|>]]\\n'
    """
    pieces, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or supervised[i] != supervised[start]:
            text = tokenizer.decode(list(input_ids[start:i]), skip_special_tokens=False)
            pieces.append(f"{mark[0]}{text}{mark[1]}" if supervised[start] else text)
            start = i
    text = "".join(pieces).replace("\n", "\\n")
    if len(text) > RENDER_LIMIT:
        half = RENDER_LIMIT // 2
        text = f"{text[:half]} ... {text[-half:]}"
    return text


def _percent(x: float) -> str:
    return f"{100 * x:.0f}%"


def check_loss_mask(rows: Any, tokenizer: Any, policy: str) -> Check:
    """Every example must supervise at least one token; shows the first with its span marked.

    Args:
        rows: untruncated prepared rows (:func:`~forge.doctor.prepare.prepare_sft`).
        tokenizer: decodes the example shown.
        policy: what the run supervises, in words ("assistant turns", "completions", "every token").
    """
    counts = [(row.get(ROW, n), supervised_count(row["labels"]), len(row["labels"]))
              for n, row in enumerate(rows, 1)]
    empty = [r for r, sup, _ in counts if sup == 0]
    fractions = sorted(sup / max(total, 1) for _, sup, total in counts)
    data = {"examples": len(counts), "without_supervision": len(empty), "policy": policy,
            "min_fraction": fractions[0] if fractions else None,
            "median_fraction": fractions[len(fractions) // 2] if fractions else None}
    first = rows[0]
    shown = render_supervised(tokenizer, first["input_ids"], [x != IGNORE for x in first["labels"]])
    details = [f"row {first.get(ROW, 1)}, supervised tokens in [[...]]: {shown}"]
    if empty:
        rows_named = ", ".join(str(r) for r in empty[:5]) + (" ..." if len(empty) > 5 else "")
        return Check("loss mask", FAIL, f"{len(empty)} of {len(counts)} examples have no supervised token "
                     f"(rows {rows_named}); they train nothing (supervised: {policy})", details, data)
    low, high = _percent(fractions[0]), _percent(fractions[-1])
    spread = f"{low} of tokens" if low == high else \
        f"{low}-{high} of tokens (median {_percent(data['median_fraction'])})"
    return Check("loss mask", OK, f"every example supervises tokens ({spread}); supervised: {policy}",
                 details, data)


def mask_failure(err: BaseException, assistant_only: bool) -> Check:
    """The FAIL for a tokenisation TRL itself refuses (no generation markers, no assistant tokens)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if assistant_only:
        message = (f"assistant_only_loss is on, but the chat template cannot mark the assistant tokens "
                   f"(no {{% generation %}} markers TRL can use): every label would be masked. TRL: {first}")
    else:
        message = f"TRL cannot tokenise the rows: {first}"
    return Check("loss mask", FAIL, message, data={"error": first})


def _token(tokenizer: Any, token_id: int | None) -> str:
    return repr(tokenizer.convert_ids_to_tokens(int(token_id))) if token_id is not None else "none"


def _example_spans(batch: dict[str, Any], lengths: list[int]) -> list[tuple[int, slice]]:
    """(batch row, token slice) of each example in a collated batch (padded or padding-free)."""
    if "position_ids" in batch and "attention_mask" not in batch:  # padding-free: one long row
        spans, offset = [], 0
        for n in lengths:
            spans.append((0, slice(offset, offset + n)))
            offset += n
        return spans
    return [(i, slice(0, n)) for i, n in enumerate(lengths)]


def _last_supervised_stop(ids: Sequence[int], labels: Sequence[int], stop_ids: set[int]) -> int | None:
    """Where the example's last response ends: its last supervised end-of-turn token."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] in stop_ids and labels[i] != IGNORE:
            return i
    return None


def _target(row: dict[str, Any], full: dict[str, Any] | None, stop_ids: set[int], mode: str) -> tuple[int | None, str]:
    """The index of the response's closing EOS in ``row`` and, when there is none, why."""
    ids, labels = list(row["input_ids"]), list(row["labels"])
    if full is None:
        found = _last_supervised_stop(ids, labels, stop_ids)
        return found, "" if found is not None else "outside"
    at = _last_supervised_stop(list(full["input_ids"]), list(full["labels"]), stop_ids)
    if at is None:
        return None, "outside"
    if mode == "keep_end":
        at -= len(full["input_ids"]) - len(ids)
    return (at, "") if 0 <= at < len(ids) and labels[at] != IGNORE else (None, "cut")


def check_eos(rows: Any, collator: Callable[[list[dict[str, Any]]], dict[str, Any]], tokenizer: Any,
              stop_ids: set[int], full: Any = None, mode: str = "keep_start", batch_size: int = 8) -> Check:
    """The end-of-turn token that closes each example's response is supervised, as ``collator`` batches it.

    Args:
        rows: prepared rows as training sees them (truncated, not packed).
        collator: the collator training uses (TRL's by default, or the user's).
        tokenizer: names the tokens in the message.
        stop_ids: token ids that end a turn (EOS and the model's generation EOS ids).
        full: the same rows untruncated (matched by the row index), to tell a cut-off EOS
            from one the chat template never supervises; None: judge ``rows`` alone.
        mode: TRL's ``truncation_mode``.
        batch_size: examples per collated batch (padding happens within a batch).
    """
    pad_id = tokenizer.pad_token_id
    eos_name = _token(tokenizer, tokenizer.eos_token_id)
    by_row = {r[ROW]: r for r in full} if full is not None else {}
    why: dict[str, list[int]] = {"outside": [], "cut": [], "collator": []}
    trained_pad = 0
    for start in range(0, len(rows), batch_size):
        chunk = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        try:
            batch = collator([model_inputs(r) for r in chunk])
        except Exception as err:  # training would stop at the same batch
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return Check("eos", FAIL, f"the collator cannot batch the rows training gets ({type(err).__name__}: "
                         f"{first})")
        labels = batch["labels"]
        lengths = [len(r["input_ids"]) for r in chunk]
        for n, (row, (b, span)) in enumerate(zip(chunk, _example_spans(batch, lengths)), start + 1):
            name = row.get(ROW, n)
            at, reason = _target(row, by_row.get(name) if full is not None else None, stop_ids, mode)
            if at is None:
                why[reason].append(name)
            elif int(labels[b, span][at]) == IGNORE:
                why["collator"].append(name)
            if "attention_mask" in batch:  # padding past the example must not be trained on
                trained_pad += int((labels[b, span.stop:] != IGNORE).sum())
    n = len(rows)
    without = sorted(why["outside"] + why["cut"] + why["collator"])
    pad_is_eos = pad_id is not None and pad_id in stop_ids
    pad_words = (f"pad {_token(tokenizer, pad_id)} is the EOS token" if pad_is_eos
                 else f"pad {_token(tokenizer, pad_id)} differs from EOS {eos_name}")
    data = {"examples": n, "without_supervised_eos": len(without), "cut": len(why["cut"]),
            "masked_by_collator": len(why["collator"]), "outside_span": len(why["outside"]),
            "pad_is_eos": pad_is_eos, "supervised_padding_tokens": trained_pad}
    if trained_pad:
        return Check("eos", FAIL, f"the collator supervises {trained_pad} padding tokens: the model learns to "
                     "emit padding; its labels must be -100 past each example", data=data)
    if why["collator"] and len(why["collator"]) + len(why["cut"]) == n:
        cause = (f"{pad_words} and the collator masks the pad id, so it masks every EOS too" if pad_is_eos
                 else "the collator masks it")
        return Check("eos", FAIL, f"the end-of-turn token {eos_name} of the responses is never trained: {cause}; "
                     "the model never learns to stop. Give the tokenizer a pad token of its own, or use TRL's "
                     "collator (it masks padding by position)", data=data)
    if len(without) == n:
        cause = ("max_length cuts it off every example" if len(why["cut"]) == n else
                 "the chat template puts it outside the supervised span")
        return Check("eos", FAIL, f"no example supervises the end-of-turn token {eos_name} that closes its "
                     f"response ({cause}): the model never learns to stop", data=data)
    if without:
        rows_named = ", ".join(str(r) for r in without[:5]) + (" ..." if len(without) > 5 else "")
        parts = [f"{len(v)} {label}" for k, label in (("cut", "cut off by max_length"),
                 ("collator", "masked by the collator"), ("outside", "outside the supervised span"))
                 if (v := why[k])]
        return Check("eos", WARN, f"{len(without)} of {n} examples do not train the end-of-turn token {eos_name} "
                     f"that closes the response ({', '.join(parts)}; rows {rows_named}); {pad_words}", data=data)
    masked = "; padding is masked by position, so EOS still trains" if pad_is_eos else ""
    return Check("eos", OK, f"the end-of-turn token {eos_name} closing each response is supervised in every "
                 f"example; {pad_words}{masked}", data=data)


def stop_token_ids(tokenizer: Any, generation_eos: int | list[int] | None = None) -> set[int]:
    """EOS of the tokenizer plus the ids the model's generation config stops at."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos:
        ids.update(int(i) for i in generation_eos)
    return ids
