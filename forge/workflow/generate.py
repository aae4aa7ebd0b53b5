"""``forge generate`` and ``forge chat``: a run's model answering prompts, formatted with the
tokenizer's chat template and decoded by transformers' ``generate``.

Generation is greedy unless a temperature above 0 is given (then sampled, seeded), so two runs
of the same prompts give the same answers and the trained model compares fairly with the model
it started from (``base=True``). ``chat`` streams each answer token by token with
transformers' ``TextStreamer`` and keeps the conversation as context.

Example:
    >>> answers = generate_run("outputs/lora", [[{"role": "user", "content": "Hi"}]])
    >>> answers[0]["completion"]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from forge.core.io import atomic_write_text
from forge.errors import ForgeError
from forge.workflow.run import device, load_run_tokenizer, load_start, load_trained, read_run

Messages = list[dict[str, Any]]


def _prompt_ids(tokenizer: Any, prompt: Messages | str, raw: bool) -> list[int]:
    if raw:
        return tokenizer(prompt if isinstance(prompt, str) else prompt[-1]["content"])["input_ids"]
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _options(tokenizer: Any, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                               "do_sample": temperature > 0}
    if tokenizer.eos_token_id is not None:
        options["eos_token_id"] = tokenizer.eos_token_id
    if temperature > 0:
        options.update(temperature=temperature, top_p=top_p)
    else:  # greedy: no sampling knobs, so transformers does not warn about unused ones
        options.update(temperature=None, top_p=None, top_k=None)
    return options


def generate(model: Any, tokenizer: Any, prompts: list[Messages | str], max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8, raw: bool = False,
             seed: int = 0) -> list[str]:
    """Answers to ``prompts`` (chats, or plain text with ``raw``), generated in left-padded batches.

    Args:
        model: a causal LM (or PEFT model) in eval mode.
        tokenizer: its tokenizer, with a chat template unless ``raw``.
        prompts: each a list of ``{role, content}`` messages (or a string with ``raw``).
        max_new_tokens: longest answer.
        temperature: 0 is greedy; above 0 samples (with ``top_p``), seeded by ``seed``.
        batch_size: prompts per ``generate`` call.
        raw: tokenize the prompt text as it is (no chat template): continuation of a document.

    Example:
        >>> generate(model, tok, [[{"role": "user", "content": "2 plus 2?"}]], max_new_tokens=8)
        ['2 plus 2 is 4.']
    """
    import torch
    from transformers import set_seed

    set_seed(seed)
    out: list[str] = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        ids = [_prompt_ids(tokenizer, p, raw) for p in prompts[start:start + batch_size]]
        width = max(map(len, ids))
        # Left padding: every prompt ends where its answer starts.
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device())
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device())
        with torch.no_grad():
            generated = model.generate(input_ids=input_ids, attention_mask=mask,
                                       **_options(tokenizer, max_new_tokens, temperature, top_p))
        out += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return [text.strip() for text in out]


def chat(model: Any, tokenizer: Any, lines: Iterable[str], write: Callable[[str], None] | None = None,
         system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
         top_p: float = 1.0) -> Messages:
    """An interactive conversation: each line read is a user turn; answers stream as they decode.

    ``/reset`` starts a new conversation, ``/exit`` (or the end of input) ends it.

    Returns:
        The conversation (of the last ``/reset``) as messages.
    """
    import sys

    import torch
    from transformers import TextStreamer

    write = write or (lambda text: print(text, end="", flush=True))
    start: Messages = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            write("(new conversation)\n")
            continue
        messages.append({"role": "user", "content": text})
        ids = torch.tensor([_prompt_ids(tokenizer, messages, raw=False)], device=device())
        write("assistant: ")
        sys.stdout.flush()
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                       **_options(tokenizer, max_new_tokens, temperature, top_p))
        answer = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})
    return messages


def read_prompts(path: str, raw: bool = False) -> list[dict[str, Any]]:
    """Prompts from a file: ``{"prompt": ...}`` rows, or any forge SFT format (the last answer of
    each row becomes its ``reference``). With ``raw``, ``text`` rows are prompts as they are.

    Returns:
        Rows ``{"prompt": messages or text, "reference": text or None}``.
    """
    from forge.recipes.data import load_examples, read_rows, resolve_data_path

    rows = read_rows(resolve_data_path(path))
    cols = set(rows.column_names)
    if "prompt" in cols and not cols & {"completion", "chosen"}:
        out = []
        for n, row in enumerate(rows, 1):
            prompt = row["prompt"]
            if not prompt or not isinstance(prompt, (str, list)):
                raise ForgeError(f"{path} row {n}: field 'prompt' must be text or a list of messages")
            if isinstance(prompt, str) and not raw:
                prompt = [{"role": "user", "content": prompt}]
            out.append({"prompt": prompt, "reference": None})
        return out
    if raw and "text" in cols:
        return [{"prompt": row["text"], "reference": None} for row in rows]
    out = []
    for row in load_examples(path, "sft"):
        if "messages" in row:
            last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
            out.append({"prompt": row["messages"][:last], "reference": row["messages"][last]["content"]})
        elif "prompt" in row:
            out.append({"prompt": row["prompt"], "reference": row["completion"][-1]["content"]})
        else:
            raise ForgeError(f"{path}: text rows have no prompt; pass --raw to continue them as text")
    return out


def generate_run(run_dir: str, prompts: list[dict[str, Any]], out: str | None = None, base: bool = False,
                 **options: Any) -> list[dict[str, Any]]:
    """Generate an answer to each prompt with a run's model (``base``: the model it started from).

    Args:
        run_dir: a ``forge train`` output directory (or any model directory).
        prompts: rows from :func:`read_prompts` (``{"prompt": ..., "reference": ...}``).
        out: a ``.jsonl`` file to write the rows with their ``completion`` to.
        base: use the model the run started from instead of the trained one.
        **options: :func:`generate` options (``max_new_tokens``, ``temperature``, ...).

    Returns:
        The rows with ``completion`` and ``model`` (``"trained"`` or ``"base"``) added.
    """
    run = read_run(run_dir)
    tokenizer = load_run_tokenizer(run)
    model = load_start(run) if base else load_trained(run)
    answers = generate(model, tokenizer, [p["prompt"] for p in prompts], **options)
    rows = [{**p, "completion": a, "model": "base" if base else "trained"} for p, a in zip(prompts, answers)]
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows
