"""Data collators that put what the loss needs into the batch, before the Trainer counts tokens.

The Trainer counts the batch's valid labels (``num_items_in_batch``, over every micro-batch of an
optimizer step) before the loss runs, so anything that changes which tokens count must happen in
the collator: :class:`ResponseOnlyCollator` turns prompt tokens into ``-100``.
:class:`ExampleWeightCollator` carries a per-example weight column as per-token ``loss_weights``,
which the patched forward hands to the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from forge.loss.strategies import response_mask


class ExampleWeightCollator:
    """Wrap a data collator to carry a per-example weight column as per-token ``loss_weights``.

    The weights are expanded along each example's tokens (also for padding-free batches, where the
    examples are concatenated into one row), aligned with ``labels`` before the causal shift. The
    patched forward removes the key from the model inputs and hands it to the loss. Keep the column
    in the dataset: set ``remove_unused_columns=False`` in the training arguments.

    Args:
        collator: The collator to wrap (e.g. TRL's ``DataCollatorForLanguageModeling``).
        column: Dataset column holding one float per example.
        key: Batch key for the weights, read by :func:`~forge.loss.example_weights`.

    Example:
        >>> collator = ExampleWeightCollator(DataCollatorForLanguageModeling(pad_token_id=0), "weight")
    """

    def __init__(self, collator: Callable, column: str = "weight", key: str = "loss_weights"):
        self.collator = collator
        self.column = column
        self.key = key

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if examples and self.column not in examples[0]:
            raise KeyError(
                f"ExampleWeightCollator: examples have no {self.column!r} column (set remove_unused_columns=False)"
            )
        weights = torch.tensor([float(ex[self.column]) for ex in examples])
        batch = self.collator([{k: v for k, v in ex.items() if k != self.column} for ex in examples])
        labels = batch["labels"]
        if labels.shape[0] == len(examples):
            batch[self.key] = weights[:, None].expand(labels.shape).contiguous()
        else:  # padding-free: one row holding every example in order
            lengths = torch.tensor([len(ex["input_ids"]) for ex in examples])
            row = torch.repeat_interleave(weights, lengths)
            out = torch.zeros(labels.shape)
            out[0, : row.numel()] = row[: labels.shape[1]]
            batch[self.key] = out
        return batch


class ResponseOnlyCollator:
    """Wrap a data collator to mask prompt tokens: labels outside responses become ``-100``.

    A response starts after ``response_template`` and runs until ``instruction_template`` (or the
    next example, in a padding-free row); both are token-id sequences searched in the input ids.
    Because the labels themselves are masked, the Trainer's token count, the loss, TRL's metrics
    and forge's ``supervised_fraction`` all see the same tokens: this is prompt masking exactly.

    Args:
        collator: The collator to wrap.
        response_template: Token ids that open a response.
        instruction_template: Token ids that open a user turn (ends a response); optional.
        ignore_index: The label value of masked tokens.

    Example:
        >>> collator = ResponseOnlyCollator(DataCollatorForLanguageModeling(pad_token_id=0), [32001])
    """

    def __init__(
        self,
        collator: Callable,
        response_template: Sequence[int],
        instruction_template: Sequence[int] | None = None,
        ignore_index: int = -100,
    ):
        if not response_template:
            raise ValueError("ResponseOnlyCollator: response_template must hold at least one token id")
        self.collator = collator
        self.response_template = list(response_template)
        self.instruction_template = list(instruction_template) if instruction_template else None
        self.ignore_index = ignore_index

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        tokens = batch.get("input_ids", batch["labels"])
        positions = batch.get("position_ids")
        starts = None if positions is None or positions.shape != tokens.shape else positions == 0
        keep = response_mask(tokens, self.response_template, self.instruction_template, starts)
        batch["labels"] = torch.where(keep, batch["labels"], torch.full_like(batch["labels"], self.ignore_index))
        return batch
