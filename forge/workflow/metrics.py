"""The numbers ``forge eval`` reports, computed in plain PyTorch on rows tokenised as TRL does.

* **Language modelling** (SFT data): the summed next-token negative log-likelihood over every
  target token, divided by their count (``loss``), and ``perplexity = exp(loss)``. Targets are
  the tokens TRL's ``SFTTrainer`` trains on: the completion of prompt/completion rows
  (``completion_only_loss``, on by default), the assistant turns of chats with
  ``assistant_only_loss``, every token otherwise. A token-weighted mean, not a mean of batch
  means, so batch size and padding do not change it.
* **Preference** (DPO data): DPO's implicit reward of a completion ``y`` for prompt ``x``,
  ``beta * (log p(y|x) - log p_ref(y|x))`` (summed over its tokens), for chosen and rejected;
  ``reward_accuracy`` is the fraction of pairs whose chosen reward is higher, ``reward_margin``
  the mean difference, and ``loss`` DPO's sigmoid loss ``-log sigmoid(margin)``.

Tokenisation follows TRL 1.16: chats through the chat template, the completion starting where
the tokenised prompt (with the generation prompt) and prompt + completion diverge; plain text
gets the EOS token appended; sequences keep their first ``max_length`` tokens.

Example:
    >>> rows = tokenize_lm(dataset, tokenizer, max_length=1024)
    >>> lm_loss(model, rows, pad_token_id=tokenizer.pad_token_id)["perplexity"]
"""

from __future__ import annotations

import math
from typing import Any

IGNORE = -100


def _chat_ids(tokenizer: Any, messages: list[dict], **kwargs: Any) -> dict[str, list[int]]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return {k: list(v) for k, v in out.items()}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_lm(dataset: Any, tokenizer: Any, max_length: int | None = None,
                completion_only_loss: bool | None = None, assistant_only_loss: bool = False) -> list[dict]:
    """``{"input_ids", "labels"}`` per row of a forge SFT dataset (TRL shapes), as TRL trains on them.

    Args:
        dataset: rows from :func:`forge.recipes.data.load_examples` (``messages``,
            ``prompt``/``completion`` or ``text``).
        completion_only_loss: targets only the completion of prompt/completion rows; None:
            TRL's default (on).
        assistant_only_loss: targets only assistant turns of ``messages`` rows (needs a chat
            template with ``{% generation %}`` markers).
    """
    rows = []
    for row in dataset:
        if "messages" in row:
            out = _chat_ids(tokenizer, row["messages"], return_assistant_tokens_mask=assistant_only_loss)
            ids = out["input_ids"]
            mask = out.get("assistant_masks") if assistant_only_loss else None
            labels = ids if mask is None else [t if m else IGNORE for t, m in zip(ids, mask)]
        elif "prompt" in row:
            prompt = _chat_ids(tokenizer, row["prompt"], add_generation_prompt=True)["input_ids"]
            ids = _chat_ids(tokenizer, row["prompt"] + row["completion"])["input_ids"]
            start = _common_prefix(prompt, ids) if completion_only_loss is not False else 0
            labels = [IGNORE] * start + ids[start:]
        else:
            text = row["text"]
            eos = tokenizer.eos_token or ""
            ids = tokenizer(text if text.endswith(eos) else text + eos)["input_ids"]
            labels = list(ids)
        if max_length:
            ids, labels = ids[:max_length], labels[:max_length]
        if any(t != IGNORE for t in labels[1:]):
            rows.append({"input_ids": list(ids), "labels": list(labels)})
    return rows


def _batches(rows: list[dict], batch_size: int, pad: int, keys: tuple[str, ...]):
    """Right-padded tensors of ``keys`` (labels padded with IGNORE) and the attention mask."""
    import torch

    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        out = {}
        for key in keys:
            fill = pad if key == "input_ids" else IGNORE
            out[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in chunk])
        out["attention_mask"] = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                              for r in chunk])
        yield out


def _token_logps(model: Any, batch: dict, device: Any) -> tuple[Any, Any]:
    """Log-probability of each next token (``[B, T-1]``) and the mask of those that are targets."""
    import torch

    with torch.no_grad():
        # use_cache=False: a cache makes transformers skip its packed-sequence mask logic, and
        # nothing here decodes.
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    labels = batch["labels"][:, 1:].to(device)
    targets = labels != IGNORE
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * targets, targets


def lm_loss(model: Any, rows: list[dict], pad_token_id: int, batch_size: int = 8, device: Any = None) -> dict:
    """Token-weighted next-token loss and perplexity of ``rows`` (from :func:`tokenize_lm`)."""
    device = device or next(model.parameters()).device
    nll, tokens = 0.0, 0
    for batch in _batches(rows, batch_size, pad_token_id, ("input_ids", "labels")):
        picked, targets = _token_logps(model, batch, device)
        nll -= float(picked.sum())
        tokens += int(targets.sum())
    if tokens == 0:
        return {"loss": None, "perplexity": None, "tokens": 0, "rows": len(rows)}
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "rows": len(rows)}


def tokenize_pairs(dataset: Any, tokenizer: Any, max_length: int | None = None) -> list[dict]:
    """Per preference row, a chosen and a rejected sequence ``{"input_ids", "labels"}`` whose
    labels mark the completion (as TRL's DPOTrainer splits and truncates them)."""
    rows = []
    for row in dataset:
        prompt = _chat_ids(tokenizer, row["prompt"], add_generation_prompt=True)["input_ids"]
        full = {k: _chat_ids(tokenizer, row["prompt"] + row[k])["input_ids"] for k in ("chosen", "rejected")}
        start = min(_common_prefix(prompt, full["chosen"]), _common_prefix(prompt, full["rejected"]))
        if max_length and start >= max_length:
            continue  # TRL drops a prompt that fills max_length: no completion token is left
        pair = {}
        for key, ids in full.items():
            ids = ids[:max_length] if max_length else ids
            pair[key] = {"input_ids": ids, "labels": [IGNORE] * start + ids[start:]}
        rows.append(pair)
    return rows


def sequence_logps(model: Any, seqs: list[dict], pad_token_id: int, batch_size: int = 8,
                   device: Any = None) -> list[float]:
    """Summed log-probability of the labelled tokens of each sequence."""
    device = device or next(model.parameters()).device
    out: list[float] = []
    for batch in _batches(seqs, batch_size, pad_token_id, ("input_ids", "labels")):
        picked, _ = _token_logps(model, batch, device)
        out += picked.sum(-1).tolist()
    return out


def preference_rewards(policy_logps: tuple[list[float], list[float]],
                       reference_logps: tuple[list[float], list[float]], beta: float) -> dict:
    """DPO's implicit rewards from chosen/rejected log-probabilities under policy and reference."""
    chosen = [beta * (p - r) for p, r in zip(policy_logps[0], reference_logps[0])]
    rejected = [beta * (p - r) for p, r in zip(policy_logps[1], reference_logps[1])]
    margins = [c - r for c, r in zip(chosen, rejected)]
    n = len(margins)
    if n == 0:
        return {"pairs": 0}
    # -log sigmoid(m) = softplus(-m), written to stay finite for large |m|
    losses = [max(-m, 0.0) + math.log1p(math.exp(-abs(m))) for m in margins]
    return {"reward_accuracy": sum(m > 0 for m in margins) / n, "reward_margin": sum(margins) / n,
            "reward_chosen": sum(chosen) / n, "reward_rejected": sum(rejected) / n,
            "loss": sum(losses) / n, "beta": beta, "pairs": n}
