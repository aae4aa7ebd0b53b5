"""Adapters whose initialisation changes the base model (PiSSA, OLoRA, CorDA), saved as plain LoRA.

PiSSA puts the principal singular directions of each weight into the adapter and leaves the
residual in the base, so an adapter saved as trained only works on that residual base, not
on the model the user started from. forge saves the initial adapter before training and, at
the end, lets PEFT convert the trained one into a standard LoRA adapter of the original base
(``save_pretrained(path_initial_model_for_weight_conversion=...)``; rank 2r). ``forge merge``,
``forge chat`` and any PEFT loader then apply it as usual.

Example:
    >>> save_initial_adapter(peft_model, "outputs/pissa")      # before training
    >>> trainer.train(); trainer.save_model("outputs/pissa")
    >>> save_as_lora(peft_model, "outputs/pissa")              # overwrites with plain LoRA
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

INITIAL_ADAPTER = "adapter_init"  # folder in the output directory
_BASE_CHANGING = ("pissa", "olora", "corda")


def changes_base(peft_config: Any) -> bool:
    """Whether a ``LoraConfig``'s ``init_lora_weights`` rewrites the base weights."""
    init = str(getattr(peft_config, "init_lora_weights", True)).lower()
    return any(init.startswith(prefix) for prefix in _BASE_CHANGING)


def save_initial_adapter(model: Any, output_dir: str) -> None:
    """Save the untrained adapter to ``OUTPUT_DIR/adapter_init`` (kept if one is there: resume).

    Saved with ``init_lora_weights: true``, as PEFT's conversion requires (loading it must not
    decompose the already residual base a second time).
    """
    target = Path(output_dir, INITIAL_ADAPTER)
    if (target / "adapter_config.json").is_file():
        return  # a resumed run: its first start saved the true initial adapter
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        model.save_pretrained(str(target))
    finally:
        config.init_lora_weights = init


def save_as_lora(model: Any, output_dir: str) -> None:
    """Overwrite the adapter in ``output_dir`` with its conversion to a LoRA adapter of the
    original base (the difference between the trained and the initial adapter)."""
    model.save_pretrained(output_dir,
                          path_initial_model_for_weight_conversion=str(Path(output_dir, INITIAL_ADAPTER)))
