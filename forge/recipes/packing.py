"""What packing does to a run, said in one line at the start (``data.packing``).

With ``packing: true`` TRL's ``SFTTrainer`` packs tokenised examples best-fit into rows of
``max_length`` tokens (``packing_strategy: bfd``, the default, or ``bfd_split``, which splits an
over-long example instead of truncating it) and collates them padding-free: one flat row per
batch with ``position_ids`` that restart at 0 for each example and no attention mask. From
those position ids transformers builds a block-diagonal causal mask for ``sdpa``, ``eager`` and
``flex_attention`` (``masking_utils.find_packed_sequence_indices``), and the flash-attention
kernels read the ``cu_seq_lens`` TRL passes: packed examples never attend to each other.
``tests/test_packing.py`` checks that a token's logits are the same alone and packed.

Two settings lose that isolation, and forge says so when a run uses them: TRL's
``packing_strategy: wrapped`` (examples concatenated and cut every ``max_length`` tokens,
attending across the cuts, as classic pre-training does), and a forward with a KV cache
(transformers skips the packed-sequence mask when a cache is passed; TRL's trainers and
``forge eval`` pass ``use_cache=False``).
"""

from __future__ import annotations

from typing import Any


def packing_note(args: Any) -> str | None:
    """The line ``forge train`` prints about packing, or None when the run does not pack."""
    if not getattr(args, "packing", False):
        return None
    strategy = getattr(args, "packing_strategy", "bfd")
    if strategy == "wrapped":
        return (f"data.packing with training.packing_strategy=wrapped: examples are concatenated and cut "
                f"every {args.max_length} tokens, and attend to each other across the cuts (the "
                "default 'bfd' keeps them apart)")
    split = ", over-long ones split" if strategy == "bfd_split" else ", over-long ones truncated"
    return (f"data.packing: examples packed best-fit into {args.max_length}-token rows{split}; "
            "padding-free, position ids restart per example, so packed examples do not attend to "
            "each other")
