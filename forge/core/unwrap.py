"""One place that sees through wrappers: DDP, DataParallel, FSDP1, ``torch.compile``, PEFT.

Two depths, because features need both: :func:`strip_wrappers` keeps a PEFT model (its
parameter names, ``base_model.model....lora_A...``, are what the Trainer checkpoints), and
:func:`unwrap` goes down to the plain transformers model under PEFT too (its structure is
what layer discovery reads). Both return modules that own the very same parameter objects.

Example:
    >>> import torch
    >>> strip_wrappers(torch.compile(torch.nn.Linear(2, 2))).__class__.__name__
    'Linear'
"""

from __future__ import annotations

from torch import nn

_DATA_PARALLEL = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (duck-typed so peft stays an optional import)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def strip_wrappers(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / FSDP1 (``.module``) and ``torch.compile`` (``._orig_mod``), so
    parameter names are the same whichever of them the caller hands over (PEFT is kept)."""
    while True:
        if type(model).__name__ in _DATA_PARALLEL and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under every wrapper, PEFT included."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        model = strip_wrappers(model)
        if is_peft_model(model):
            model = model.get_base_model()
    return model
