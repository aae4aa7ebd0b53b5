"""The training methods a preset can name, and what each one is made of in TRL.

One row per ``method:`` value: TRL's config class (validates the ``training:`` section), its
trainer class (what ``forge train`` builds), the kind of data it trains on, and the preset
sections it does not work with yet. Classes are named ``module:attribute`` and imported when
used, so reading a preset never imports a trainer.

========  =================================  ==============================================
method    TRL                                data
========  =================================  ==============================================
``sft``   ``SFTTrainer`` / ``SFTConfig``     messages, prompt/completion, alpaca, text
``dpo``   ``DPOTrainer`` / ``DPOConfig``     prompt/chosen/rejected (or chosen/rejected)
``orpo``  ``trl.experimental.orpo``          prompt/chosen/rejected
``cpo``   ``trl.experimental.cpo``           prompt/chosen/rejected (SimPO: loss_type simpo)
``kto``   ``KTOTrainer`` / ``KTOConfig``     prompt/completion/label, or pairs (unpaired)
========  =================================  ==============================================

Example:
    >>> from forge.config.methods import METHOD_TABLE, trainer_class
    >>> METHOD_TABLE["kto"].data
    'unpaired'
    >>> trainer_class("sft").__name__
    'SFTTrainer'
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from typing import Any

# Why a section is refused with a method; the schema turns these into one `forge: error:` line.
_FREEZE_PREFERENCE = ("freezing blocks is not supported with {method} yet (see docs/layers.md): "
                      "with TRL's preference trainers a frozen first block fails the gradient "
                      "checkpointing recompute check and resume is not exact")
_LOSS_NOT_SFT = ("the token-level loss applies to sft only; {method} has its own loss "
                 "(training.loss_type or training.beta)")
_PACKING_NOT_SFT = "packing applies to sft only; set it to false for {method}"


@dataclass(frozen=True)
class Method:
    """One training method: TRL's classes for it and the data it needs.

    Attributes:
        name: the ``method:`` value.
        config: TRL's config class, ``module:attribute``.
        trainer: TRL's trainer class, ``module:attribute``.
        data: ``"lm"`` (SFT formats), ``"preference"`` (chosen/rejected pairs) or
            ``"unpaired"`` (prompt/completion/label; pairs are unpaired by TRL).
        reference: whether the method holds a frozen reference model (the adapter switched
            off under PEFT, a copy of the model otherwise).
        experimental: the classes live in ``trl.experimental`` (unstable API in TRL 1.x).
        refuses: preset section (or dotted key) -> why it is refused with this method.
        summary: one line for the docs.
    """

    name: str
    config: str
    trainer: str
    data: str
    reference: bool = False
    experimental: bool = False
    refuses: dict[str, str] = field(default_factory=dict)
    summary: str = ""


def _preference_refusals() -> dict[str, str]:
    return {"loss": _LOSS_NOT_SFT, "freeze": _FREEZE_PREFERENCE, "data.packing": _PACKING_NOT_SFT}


METHOD_TABLE: dict[str, Method] = {
    "sft": Method("sft", "trl:SFTConfig", "trl:SFTTrainer", "lm",
                  summary="supervised fine-tuning (TRL `SFTTrainer`); also continued pre-training on text"),
    "dpo": Method("dpo", "trl:DPOConfig", "trl:DPOTrainer", "preference", reference=True,
                  refuses=_preference_refusals(),
                  summary="Direct Preference Optimization (TRL `DPOTrainer`)"),
    "orpo": Method("orpo", "trl.experimental.orpo:ORPOConfig", "trl.experimental.orpo:ORPOTrainer",
                   "preference", experimental=True, refuses=_preference_refusals(),
                   summary="Odds-Ratio Preference Optimization, no reference model "
                   "(TRL `trl.experimental.orpo.ORPOTrainer`)"),
    "cpo": Method("cpo", "trl.experimental.cpo:CPOConfig", "trl.experimental.cpo:CPOTrainer",
                  "preference", experimental=True, refuses=_preference_refusals(),
                  summary="Contrastive Preference Optimization; `training.loss_type: simpo` is SimPO "
                  "(TRL `trl.experimental.cpo.CPOTrainer`)"),
    "kto": Method("kto", "trl:KTOConfig", "trl:KTOTrainer", "unpaired", reference=True,
                  refuses=_preference_refusals(),
                  summary="Kahneman-Tversky Optimization on unpaired good/bad examples (TRL `KTOTrainer`)"),
}
METHODS = tuple(METHOD_TABLE)


def refusals(method: str) -> dict[str, str]:
    """Preset section (or dotted key) -> the reason it is refused with ``method``, filled in."""
    spec = METHOD_TABLE[method]
    return {key: reason.format(method=method) for key, reason in spec.refuses.items()}


def _import(name: str) -> Any:
    module, _, attr = name.partition(":")
    with warnings.catch_warnings():
        # trl.experimental warns on import that its API is unstable; forge says so once, in
        # its own words, when such a method trains (forge.recipes.runner).
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        return getattr(importlib.import_module(module), attr)


def config_class(method: str) -> type:
    """TRL's config class for a method, e.g. ``trl.SFTConfig`` for ``"sft"``."""
    return _import(METHOD_TABLE[method].config)


def trainer_class(method: str) -> type:
    """TRL's trainer class for a method, e.g. ``trl.DPOTrainer`` for ``"dpo"``."""
    return _import(METHOD_TABLE[method].trainer)
