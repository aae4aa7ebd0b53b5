"""The data checks together: on forge's rows before a trainer exists, or on a built trainer.

:func:`data_checks` is what ``forge doctor`` and the start of ``forge train`` run: rows,
loss mask, EOS, truncation and packing (SFT), or the pair checks (DPO), all on TRL's own
tokenisation (:mod:`forge.doctor.prepare`). :func:`check_trainer` runs the mask, EOS and
packing checks on any built TRL ``SFTTrainer``: its prepared dataset and its own collator,
whatever that is, for plain HF code.

Example:
    >>> checks = data_checks(train_rows, tokenizer, args, "sft")
    >>> print(format_checks(checks))
    >>> check_trainer(trainer)          # an SFTTrainer you built yourself
"""

from __future__ import annotations

from typing import Any

from forge.doctor.dpo import dpo_checks
from forge.doctor.lengths import check_packing, check_truncation
from forge.doctor.mask import check_eos, check_loss_mask, mask_failure, stop_token_ids
from forge.doctor.prepare import (
    completion_only,
    dpo_collator,
    prepare_dpo,
    prepare_sft,
    sft_collator,
    with_row_index,
)
from forge.doctor.result import Check
from forge.doctor.rows import check_rows

__all__ = ["check_trainer", "data_checks", "supervision_policy"]


def supervision_policy(args: Any, first_row: dict[str, Any], tokenizer: Any) -> str:
    """What an SFT run supervises, in words."""
    if getattr(args, "assistant_only_loss", False):
        return "assistant turns only"
    if completion_only(tokenizer, args, first_row):
        return "completions only"
    return "every token (prompts too; training.assistant_only_loss: true trains on replies only)" \
        if "messages" in first_row else "every token"


def data_checks(dataset: Any, tokenizer: Any, args: Any, method: str, *, eval_dataset: Any = None,
                collator: Any = None, model_config: Any = None, generation_eos: Any = None,
                max_length: int | None = None) -> list[Check]:
    """Rows, loss mask, EOS, truncation and packing (or the DPO pair checks) of a data sample.

    Args:
        dataset: forge's rows (:func:`forge.recipes.data.load_examples`), a sample is enough.
        tokenizer: the run's tokenizer (as :func:`forge.recipes.model.load_tokenizer` returns it).
        args: the run's ``SFTConfig`` / ``DPOConfig``; not changed.
        method: ``"sft"`` or ``"dpo"``.
        eval_dataset: evaluation rows, to find those that are also training rows.
        collator: the collator training will use; None: the one TRL builds.
        model_config: the model's config (for the packed attention mask), or None.
        generation_eos: the model's ``generation_config.eos_token_id`` (more stop tokens).
        max_length: the effective ``max_length`` (after capping at the model's positions);
            default ``args.max_length``.
    """
    max_length = args.max_length if max_length is None else max_length
    checks = check_rows(dataset, eval_dataset)
    rows = with_row_index(dataset)
    stops = stop_token_ids(tokenizer, generation_eos)
    if method == "dpo":
        try:
            prepared = prepare_dpo(rows, tokenizer, args)
        except (ValueError, RuntimeError, KeyError) as err:
            return [*checks, mask_failure(err, False)]
        run_args = _with(args, max_length=max_length)
        return [*checks, *dpo_checks(prepared, collator or dpo_collator(tokenizer, run_args), tokenizer, stops,
                                     max_length)]
    assistant_only = bool(getattr(args, "assistant_only_loss", False))
    try:
        full = prepare_sft(rows, tokenizer, args, max_length=None)
        trained = None if args.packing else prepare_sft(rows, tokenizer, args, max_length=max_length)
    except (ValueError, RuntimeError) as err:  # TRL refuses the template or finds no assistant tokens
        return [*checks, mask_failure(err, assistant_only)]
    checks.append(check_loss_mask(full, tokenizer, supervision_policy(args, dataset[0], tokenizer)))
    collate = collator or sft_collator(tokenizer, _with(args, packing=False))
    if trained is not None:
        checks.append(check_eos(trained, collate, tokenizer, stops, full=full, mode=args.truncation_mode))
    else:  # packed: examples are cut (keep_start) before packing; judge them cut that way
        keep = max_length or None
        cut = [{**r, "input_ids": r["input_ids"][:keep], "labels": r["labels"][:keep]} for r in full]
        checks.append(check_eos(cut, collate, tokenizer, stops, full=full))
    checks.append(check_truncation(full, trained, max_length, args.truncation_mode,
                                   args.packing_strategy if args.packing else None))
    if args.packing:
        packed = prepare_sft(rows, tokenizer, args, max_length=max_length, packing=True)
        checks.append(check_packing(packed, collator or sft_collator(tokenizer, args), model_config,
                                    args.packing_strategy))
    return checks


def _with(args: Any, **changes: Any) -> Any:
    import copy

    out = copy.copy(args)
    for key, value in changes.items():
        setattr(out, key, value)
    return out


def check_trainer(trainer: Any, sample: int = 256) -> list[Check]:
    """The loss-mask, EOS and packing checks on a built TRL ``SFTTrainer``, with its own collator.

    Args:
        trainer: an ``SFTTrainer`` (its ``train_dataset`` is already tokenised).
        sample: rows to check.

    Returns:
        The checks (truncation is not among them: the trainer's rows are already cut).

    Example:
        >>> trainer = SFTTrainer(model, args=args, train_dataset=ds, data_collator=my_collator)
        >>> print(format_checks(check_trainer(trainer)))
    """
    ds = trainer.train_dataset
    ds = ds.select(range(min(sample, len(ds))))
    tokenizer = getattr(trainer, "processing_class", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    generation = getattr(getattr(trainer.model, "generation_config", None), "eos_token_id", None)
    stops = stop_token_ids(tokenizer, generation)
    policy = supervision_policy(trainer.args, {}, tokenizer) if not trainer.args.assistant_only_loss \
        else "assistant turns only"
    checks = [check_loss_mask(ds, tokenizer, policy)]
    if trainer.args.packing:
        checks.append(check_packing(ds, trainer.data_collator, trainer.model.config, trainer.args.packing_strategy))
    else:
        checks.append(check_eos(ds, trainer.data_collator, tokenizer, stops))
    return checks
