"""The phases of a forge run, and what each preset section does in each.

A run is made from one :class:`RunConfig` (resolved once from the preset: plain values and the
real HF/TRL/PEFT config objects) and goes through three phases, in this order:

1. **model transforms**: quantization and PEFT (at load), then ``freeze`` (static freezing,
   layer-wise LR) and ``loss`` (the fused LM head), each changing the model in place;
2. **memory planning**: ``autotune`` measures the model *as transformed* and budgets what the
   other sections will hold beside each step (:data:`SECTIONS` ``reserve``: the EMA shadow, the
   monitor's weight copy; a DPO reference model);
3. **trainer callbacks**: the freeze schedule, EMA, the monitor, autotune's record, the
   trackers, and last the checkpoint completion marker.

A section's hook returns trainer keyword arguments and, under ``"args"``, the training-argument
fields it wants changed; :class:`Run` applies them and refuses two sections that disagree. No
section reads or changes another section's state.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from forge.core.hooks import ARGS
from forge.errors import ForgeError


@dataclass
class RunConfig:
    """Everything a run is made from, resolved from a preset once.

    Attributes:
        name, source: the preset's name and file.
        method: ``sft`` or ``dpo``.
        model, data: the ``model:`` and ``data:`` sections (dataclasses).
        training_args: the real ``trl.SFTConfig`` / ``trl.DPOConfig``.
        peft: a ``peft.LoraConfig`` or None; quantization: a ``BitsAndBytesConfig`` or None.
        features: enabled feature sections by name, as their config dataclasses.
        trackers: the tracker specs.
        preset_yaml: the resolved preset, as written next to the run.
    """

    name: str
    source: str
    method: str
    model: Any
    data: Any
    training_args: Any
    peft: Any
    quantization: Any
    features: dict[str, Any]
    trackers: list[Any]
    preset_yaml: str
    explicit_training: frozenset[str] = frozenset()  # keys the preset set under `training:`

    @classmethod
    def from_preset(cls, preset: Any) -> RunConfig:
        """Resolve a :class:`~forge.config.loader.Preset` (builds the HF config objects)."""
        from forge.config.schema import FEATURE_SECTIONS

        features = {}
        for section in FEATURE_SECTIONS:
            cfg = preset.feature(section)
            if cfg is not None and getattr(cfg, "enabled", True):
                features[section] = cfg
        if "loss" in preset.config:  # the loss section has no `enabled`: present means on
            features["loss"] = preset.feature("loss")
        return cls(name=preset.name, source=preset.source, method=preset.method,
                   model=preset.model, data=preset.data, training_args=preset.training_args(),
                   peft=preset.peft_config(), quantization=preset.quantization_config(),
                   features=features, trackers=preset.tracker_specs(), preset_yaml=preset.to_yaml(),
                   explicit_training=frozenset(preset.config["training"]))


@dataclass(frozen=True)
class Section:
    """What one preset section does in each phase (``module:function`` names, imported when used).

    Hooks take ``(cfg, model, training_args)``; ``reserve`` returns bytes, the others trainer
    keyword arguments (with training-argument changes under ``"args"``).
    """

    transform: str | None = None
    reserve: str | None = None
    callbacks: str | None = None


# Phase 1 runs the transforms in this order; phase 3 adds the callbacks in this order.
SECTIONS: dict[str, Section] = {
    "freeze": Section(transform="forge.layers.config:transform", callbacks="forge.layers.config:callbacks"),
    "loss": Section(transform="forge.loss.config:transform"),
    "ema": Section(reserve="forge.ema.config:reserved_bytes", callbacks="forge.ema.config:from_preset"),
    "monitor": Section(reserve="forge.monitor.config:reserved_bytes", callbacks="forge.monitor.callback:from_preset"),
    "autotune": Section(),  # phase 2 itself, see Run.plan_memory
}


def _hook(name: str) -> Callable[..., Any]:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class Run:
    """A run as the phases build it: the model, the data, and the trainer's keyword arguments."""

    config: RunConfig
    model: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    trainer_kwargs: dict[str, Any] = field(default_factory=lambda: {"callbacks": []})
    reserved: dict[str, int] = field(default_factory=dict)
    _arg_owner: dict[str, str] = field(default_factory=dict)

    @property
    def args(self) -> Any:
        return self.config.training_args

    def merge(self, section: str, extra: dict[str, Any]) -> None:
        """Take a hook's result: callbacks add up; any other key, and any argument, has one owner."""
        extra = dict(extra)
        for name, value in (extra.pop(ARGS, None) or {}).items():
            owner = self._arg_owner.get(name)
            if owner is not None and owner != section and getattr(self.args, name) != value:
                raise ForgeError(f"{section}: wants training.{name}={value!r}, but {owner} set it to "
                                 f"{getattr(self.args, name)!r}")
            setattr(self.args, name, value)
            self._arg_owner[name] = section
        self.trainer_kwargs["callbacks"].extend(extra.pop("callbacks", []))
        for key, value in extra.items():
            if key in self.trainer_kwargs:
                raise ForgeError(f"{section}: conflicts with another section over '{key}'")
            self.trainer_kwargs[key] = value

    # -- the phases ----------------------------------------------------------------------------
    def transform_model(self) -> None:
        """Phase 1 (after quantization and PEFT at load): each section's model transform."""
        for section, hooks in SECTIONS.items():
            cfg = self.config.features.get(section)
            if cfg is not None and hooks.transform:
                self.merge(section, _call(section, hooks.transform, cfg, self.model, self.args))

    def plan_memory(self) -> None:
        """Phase 2: what the sections will hold beside a step, then autotune on the final model."""
        for section, hooks in SECTIONS.items():
            cfg = self.config.features.get(section)
            if cfg is not None and hooks.reserve:
                self.reserved[section] = int(_call(section, hooks.reserve, cfg, self.model))
        cfg = self.config.features.get("autotune")
        if cfg is None:
            return
        from forge.autotune.config import from_preset

        extra = _call("autotune", from_preset, cfg, self.model, self.args, self.train_dataset,
                      self.tokenizer, sum(self.reserved.values()))
        self.merge("autotune", extra)

    def add_callbacks(self) -> None:
        """Phase 3: each section's callbacks, then the trackers, then the completion marker."""
        from forge.recipes.checkpoints import CheckpointCompleteCallback
        from forge.trackers.config import callbacks as tracker_callbacks

        for section, hooks in SECTIONS.items():
            cfg = self.config.features.get(section)
            if cfg is not None and hooks.callbacks:
                self.merge(section, _call(section, hooks.callbacks, cfg, self.model, self.args))
        if self.config.trackers:
            self.merge("trackers", tracker_callbacks(self.config.trackers, self.args, self.config.preset_yaml))
        # Last, so it marks a checkpoint complete only after every other callback saved into it.
        self.trainer_kwargs["callbacks"].append(CheckpointCompleteCallback())


def _call(section: str, hook: str | Callable[..., Any], *args: Any) -> Any:
    """Run a hook; a ``ValueError`` from a feature (a selection the model cannot satisfy) is the
    user's to fix, so it becomes one line naming the section."""
    fn = _hook(hook) if isinstance(hook, str) else hook
    try:
        return fn(*args)
    except ValueError as err:
        raise ForgeError(f"{section}: {str(err).strip().splitlines()[0]}") from None
