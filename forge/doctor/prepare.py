"""The rows and batches training will see, made by TRL's own code, without a model.

The checks must judge what the trainer trains on, not a re-implementation of it, so the rows
are tokenised by TRL's own ``SFTTrainer._prepare_dataset`` / ``DPOTrainer._prepare_dataset``
(chat template, assistant and completion masks, labels, truncation, packing) and batched by
the collator the trainer would build. Those methods read three attributes of the trainer
(``_tokenizer``, ``chat_template``, ``completion_only_loss``); :class:`_SFTView` sets them
exactly as ``SFTTrainer.__init__`` does, so no model needs to be loaded. The test suite
compares the result with a real ``SFTTrainer``'s ``train_dataset`` so a TRL change that
breaks this is caught.

Example:
    >>> rows = prepare_sft(dataset, tokenizer, args, max_length=None)  # untruncated labels
    >>> batch = sft_collator(tokenizer, args)([rows[0], rows[1]])
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

ROW = "forge_doctor_row"  # the source row of each prepared example, kept through TRL's maps


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No ``datasets`` progress bars while the checks tokenise (they are not the user's run)."""
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def with_row_index(dataset: Any) -> Any:
    """The dataset with a column numbering its rows from 1 (as the data checks name rows)."""
    return dataset.add_column(ROW, list(range(1, len(dataset) + 1)))


def _pad_token(tokenizer: Any, args: Any) -> Any:
    # As both trainers pick it: the argument, the tokenizer's own, else EOS.
    return getattr(args, "pad_token", None) or tokenizer.pad_token or tokenizer.eos_token


def training_chat_template(tokenizer: Any, args: Any) -> str | None:
    """The template ``SFTTrainer`` swaps in for assistant-only loss (None: the tokenizer's own).

    Raises:
        ValueError: TRL's own, when assistant-only loss is on, the template has no
            ``{% generation %}`` markers and TRL has no training template for it.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = getattr(tokenizer, "chat_template", None)
    if getattr(args, "assistant_only_loss", False) and template and not has_generation_markers(template):
        return get_training_chat_template(tokenizer)
    return None


class _SFTView:
    """What ``SFTTrainer._prepare_dataset`` reads from the trainer, set as its ``__init__`` sets it."""

    def __init__(self, tokenizer: Any, args: Any, first_row: dict[str, Any]) -> None:
        import trl

        self._prepare = trl.SFTTrainer._prepare_dataset
        self._tokenizer = tokenizer
        self.chat_template = training_chat_template(tokenizer, args)
        explicit = getattr(args, "completion_only_loss", None)
        self.completion_only_loss = ("prompt" in first_row and "completion" in first_row) \
            if explicit is None else bool(explicit)

    def prepare(self, dataset: Any, args: Any, packing: bool) -> Any:
        return self._prepare(self, dataset, self._tokenizer, args, packing, None, "doctor")


class _DPOView:
    def __init__(self, tokenizer: Any) -> None:
        import trl

        self._prepare = trl.DPOTrainer._prepare_dataset
        self._tokenizer = tokenizer

    def prepare(self, dataset: Any, args: Any) -> Any:
        return self._prepare(self, dataset, self._tokenizer, args, "doctor")


def _args_copy(args: Any, **changes: Any) -> Any:
    out = copy.copy(args)
    # Keep rows in their order, so each prepared row can be matched with its source row.
    out.shuffle_dataset = False
    out.dataset_num_proc = None
    for key, value in changes.items():
        setattr(out, key, value)
    return out


def completion_only(tokenizer: Any, args: Any, first_row: dict[str, Any]) -> bool:
    """Whether SFT trains only on completions (prompt-completion rows; TRL's default)."""
    return _SFTView(tokenizer, args, first_row).completion_only_loss


def prepare_sft(dataset: Any, tokenizer: Any, args: Any, *, max_length: int | None,
                packing: bool = False) -> Any:
    """Tokenise SFT rows as ``SFTTrainer`` does: ``input_ids`` and ``labels`` (-100 = not trained).

    Args:
        dataset: forge rows (:func:`forge.recipes.data.load_examples`), best with
            :func:`with_row_index` so each result names its source row.
        tokenizer: the run's tokenizer (pad token and chat template set).
        args: the run's ``SFTConfig``; not changed.
        max_length: the truncation length (None: untruncated, to see what a cut removes).
        packing: pack as the run would (``seq_lengths`` per packed row).
    """
    tokenizer.pad_token = _pad_token(tokenizer, args)
    view = _SFTView(tokenizer, args, dataset[0])
    with quiet_datasets():
        return view.prepare(dataset, _args_copy(args, max_length=max_length, packing=packing), packing)


def prepare_dpo(dataset: Any, tokenizer: Any, args: Any) -> Any:
    """Tokenise preference rows as ``DPOTrainer`` does: ``prompt_ids``, ``chosen_ids``, ``rejected_ids``
    (untruncated: its collator truncates each batch, see :func:`dpo_collator`)."""
    tokenizer.pad_token = _pad_token(tokenizer, args)
    with quiet_datasets():
        return _DPOView(tokenizer).prepare(dataset, _args_copy(args, max_length=None))


def sft_collator(tokenizer: Any, args: Any) -> Any:
    """The collator ``SFTTrainer`` builds when given none (padding-free for BFD packing)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    padding_free = bool(args.padding_free or (args.packing and args.packing_strategy in {"bfd", "bfd_split"}))
    tokenizer.pad_token = _pad_token(tokenizer, args)
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free,
                                           pad_to_multiple_of=args.pad_to_multiple_of)


def dpo_collator(tokenizer: Any, args: Any) -> Any:
    """The collator ``DPOTrainer`` builds when given none (it truncates to ``max_length``)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tokenizer.pad_token = _pad_token(tokenizer, args)
    return DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length,
                                     truncation_mode=args.truncation_mode,
                                     pad_to_multiple_of=args.pad_to_multiple_of)


def model_inputs(row: dict[str, Any]) -> dict[str, Any]:
    """The columns of a prepared row a collator takes (the row index and text columns left out)."""
    keep = ("input_ids", "labels", "seq_lengths", "prompt_ids", "chosen_ids", "rejected_ids")
    return {k: row[k] for k in keep if k in row}
