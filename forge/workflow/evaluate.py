"""``forge eval``: a run's model on held-out data, and optionally on lm-evaluation-harness tasks.

* SFT data (any forge format: messages, prompt/completion, alpaca, text): held-out ``loss``
  and ``perplexity``, on the tokens the run trained on (its ``completion_only_loss`` and
  ``assistant_only_loss``), cut at the run's ``data.max_length``.
* Preference data (prompt/chosen/rejected, or chosen/rejected): DPO's reward accuracy and
  margin, with the reference model as DPO defines it: the model the run started from (the
  base with the adapter switched off for LoRA on a base model; otherwise that model loaded
  beside the trained one). ``beta`` is the run's ``training.beta`` (0.1 when it has none).
* ``tasks``: EleutherAI's ``lm-eval`` (an optional dependency, imported only then) on the same
  model; a missing install is one line saying what to install.

See :mod:`forge.workflow.metrics` for the exact definitions.

Example:
    >>> result = evaluate_run("outputs/lora", "held_out.jsonl", out="outputs/lora/eval.json")
    >>> result["perplexity"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forge.core.io import json_safe, write_json
from forge.errors import ForgeError
from forge.workflow.metrics import lm_loss, preference_rewards, sequence_logps, tokenize_lm, tokenize_pairs
from forge.workflow.run import RunDir, load_run_tokenizer, load_start, load_trained, read_run

DEFAULT_BETA = 0.1  # TRL's DPOConfig default


def evaluate_run(run_dir: str, data: str | None = None, fmt: str | None = None,
                 max_samples: int | None = None, columns: dict[str, str] | None = None,
                 base: bool = False, out: str | None = None, tasks: list[str] | None = None,
                 limit: int | None = None, batch_size: int = 8, beta: float | None = None) -> dict[str, Any]:
    """Evaluate a run's trained model (``base``: the model it started from); returns the metrics.

    Args:
        run_dir: a ``forge train`` output directory (or any model directory).
        data: a data file in a forge format; SFT formats give loss/perplexity, preference
            formats reward accuracy/margin.
        fmt, max_samples, columns: as ``data.format``, ``data.max_samples``, ``data.columns``.
        base: evaluate the starting model instead (SFT data only: with preference data it is
            the reference itself).
        out: also write the metrics to this JSON file.
        tasks: lm-eval task names (needs ``pip install lm-eval``); ``limit``: examples per task.
        batch_size: sequences per forward pass.
        beta: DPO's beta for the rewards; None: the run's ``training.beta``, else 0.1.

    Raises:
        ForgeError: nothing to evaluate, a bad data file, lm-eval missing, ``base`` with
            preference data.
    """
    if not data and not tasks:
        raise ForgeError("forge eval: nothing to evaluate; give --data FILE and/or --tasks NAMES")
    if tasks:
        _require_lm_eval()
    run = read_run(run_dir)
    kind, dataset = (None, None) if not data else _load(data, fmt, max_samples, columns)
    if kind == "preference" and base:
        raise ForgeError("--base with preference data: the starting model is DPO's reference, so "
                         "every reward would be 0; evaluate the trained run instead")
    tokenizer = load_run_tokenizer(run)
    max_length = run.preset.data.max_length if run.preset is not None else None
    training = run.preset.config["training"] if run.preset is not None else {}
    result: dict[str, Any] = {"run": str(run.path), "model": "base" if base else "trained"}
    rows = pairs = None
    if kind == "lm":  # tokenised before the model loads: a bad row should not wait for it
        rows = tokenize_lm(dataset, tokenizer, max_length, training.get("completion_only_loss"),
                           bool(training.get("assistant_only_loss", False)))
    elif kind == "preference":
        pairs = tokenize_pairs(dataset, tokenizer, max_length)
    model = load_start(run) if base else load_trained(run)
    pad = tokenizer.pad_token_id
    if rows is not None:
        result.update(data=data, kind="lm", **lm_loss(model, rows, pad, batch_size))
    if pairs is not None:
        beta = beta if beta is not None else float(training.get("beta", DEFAULT_BETA))
        policy = _pair_logps(model, pairs, pad, batch_size)
        reference = _reference_logps(run, model, pairs, pad, batch_size)
        result.update(data=data, kind="preference", reference=run.start,
                      **preference_rewards(policy, reference, beta))
    if tasks:
        result["lm_eval"] = run_lm_eval(model, tokenizer, tasks, limit, batch_size)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(result, out)
    return result


def _load(data: str, fmt: str | None, max_samples: int | None, columns: dict[str, str] | None) -> tuple[str, Any]:
    """The kind of data (``lm`` or ``preference``) and its rows in TRL shape."""
    from forge.recipes.data import PREFERENCE_FORMATS, load_examples

    fmt = fmt or _detect(data, columns)
    if fmt == "unpaired_preference":
        raise ForgeError(f"{data}: unpaired (prompt/completion/label) rows are not evaluated; give "
                         "SFT rows for loss/perplexity or prompt/chosen/rejected rows for rewards")
    kind = "preference" if fmt in PREFERENCE_FORMATS else "lm"
    return kind, load_examples(data, "dpo" if kind == "preference" else "sft", fmt,
                               max_samples=max_samples, columns=columns)


def _detect(data: str, columns: dict[str, str] | None) -> str:
    from forge.recipes.data import detect_format, is_hub_name, read_hub, read_rows, resolve_data_path

    ds = read_hub(data, "train") if is_hub_name(data) else read_rows(resolve_data_path(data))
    names = [columns.get(c, c) for c in ds.column_names] if columns else ds.column_names
    return detect_format(names, "sft")


def _pair_logps(model: Any, pairs: list[dict], pad: int, batch_size: int) -> tuple[list[float], list[float]]:
    return (sequence_logps(model, [p["chosen"] for p in pairs], pad, batch_size),
            sequence_logps(model, [p["rejected"] for p in pairs], pad, batch_size))


def _reference_logps(run: RunDir, model: Any, pairs: list[dict], pad: int, batch_size: int):
    """Log-probabilities under DPO's reference: the model the run started from."""
    starts_on_base = run.adapter_base is not None and run.preset is not None and \
        run.preset.model.name_or_path == run.adapter_base
    if starts_on_base or (run.adapter_base is not None and run.preset is None):
        with model.disable_adapter():  # the base itself, without a second copy in memory
            return _pair_logps(model, pairs, pad, batch_size)
    return _pair_logps(load_start(run), pairs, pad, batch_size)


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ForgeError("--tasks runs EleutherAI's lm-evaluation-harness, which is not installed: "
                         "pip install lm-eval (or pip install 'transformers-forge[eval]')") from None


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], limit: int | None = None,
                batch_size: int = 8) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on an already loaded model; its per-task results."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    try:
        results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                                  tasks=list(tasks), limit=limit)
    except Exception as err:  # unknown task, dataset not in the offline cache: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ForgeError(f"--tasks {','.join(tasks)}: lm-eval failed: {first}") from None
    return json_safe(results.get("results", {}))
