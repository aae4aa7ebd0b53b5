"""Feature combinations that forge or TRL refuse (or do not support), as one table.

Each :class:`Combination` says when it applies (a predicate over the resolved run), what
happens to a run that has it, and where: ``preset`` (``load_preset`` refuses it),
``build`` (``forge train`` refuses it after loading the model, or TRL raises while building
its trainer) or ``train`` (refused when training starts, e.g. under a sharded launch).
``forge doctor`` reports a refused one as FAIL before anything loads, an unsupported one
as WARN. ``tests/test_doctor_combos.py`` runs every row's ``example`` through the real path
(``load_preset``, ``build_trainer``, the feature's own check) and asserts the table is right.

Example:
    >>> [c.key for c in matching(setup)]
    ['loss-with-loss-type']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from forge.doctor.result import FAIL, OK, WARN, Check

REFUSED, UNSUPPORTED = "refused", "unsupported"


@dataclass
class Setup:
    """What the predicates look at.

    Attributes:
        config: the resolved preset as a dict (``Preset.to_dict()``).
        args: the run's ``SFTConfig`` / ``DPOConfig``.
        model_config: the model's config (read without weights), or None.
        data_format: the detected data format (``messages``, ``text``, ...), or None.
        accelerator: whether a GPU (or other accelerator) is available.
    """

    config: dict[str, Any]
    args: Any
    model_config: Any = None
    data_format: str | None = None
    accelerator: bool = False


@dataclass(frozen=True)
class Combination:
    """One row of the table: a combination, what happens to it, and an example of it."""

    key: str
    summary: str
    applies: Callable[[Setup], bool]
    verdict: str  # REFUSED or UNSUPPORTED
    stage: str  # "preset", "build" or "train"
    reason: str
    # Overrides of the demo preset that have the combination (``data.path: rows:text`` stands for a
    # small file of plain-text rows, which the test writes).
    example: dict[str, Any] = field(default_factory=dict)


def _on(setup: Setup, section: str) -> bool:
    value = setup.config.get(section)
    if section == "loss":
        return value is not None
    return bool(value is True or isinstance(value, dict) and value.get("enabled"))


def _get(setup: Setup, dotted: str) -> Any:
    node: Any = setup.config
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _sharded(setup: Setup) -> bool:
    return bool(getattr(setup.args, "fsdp", None) or getattr(setup.args, "deepspeed", None))


def _fsdp1(setup: Setup) -> bool:
    cfg = getattr(setup.args, "fsdp_config", None) or {}
    version = cfg.get("version", cfg.get("fsdp_version", 2))
    return bool(getattr(setup.args, "fsdp", None)) and int(version) == 1


def _custom_loss(setup: Setup) -> bool:
    loss = setup.config.get("loss") or {}
    return bool(loss.get("strategy") or loss.get("fused") or loss.get("z_loss") or loss.get("label_smoothing")
                or loss.get("weight_column"))


def _tied(setup: Setup) -> bool:
    return bool(getattr(setup.model_config, "tie_word_embeddings", False))


_DPO = {"method": "dpo", "data.path": "builtin:demo-dpo"}
_FREEZE_SCHEDULE = {"freeze.enabled": True, "freeze.schedule": "gradual", "freeze.every_n_steps": 2}

COMBINATIONS: tuple[Combination, ...] = (
    Combination("dpo-with-loss", "method dpo with a loss: section", lambda s: s.config.get("method") == "dpo"
                and _on(s, "loss"), REFUSED, "preset", "the token-level loss applies to sft only",
                {**_DPO, "loss.strategy": "focal"}),
    Combination("dpo-with-freeze", "method dpo with freeze: enabled", lambda s: s.config.get("method") == "dpo"
                and _on(s, "freeze"), REFUSED, "preset", "freezing blocks is not supported with dpo yet",
                {**_DPO, "freeze.enabled": True, "freeze.first": 1}),
    Combination("dpo-with-packing", "method dpo with data.packing", lambda s: s.config.get("method") == "dpo"
                and bool(_get(s, "data.packing")), REFUSED, "preset", "pairs cannot be packed",
                {**_DPO, "data.packing": True}),
    Combination("quantized-full-finetune", "model.quantization without a peft: section",
                lambda s: bool(_get(s, "model.quantization")) and s.config.get("peft") is None, REFUSED, "preset",
                "a quantized model cannot be fully fine-tuned", {"model.quantization": {"load_in_4bit": True}}),
    Combination("loss-with-loss-type", "a loss: strategy (or fused head) with training.loss_type other than nll",
                lambda s: _custom_loss(s) and getattr(s.args, "loss_type", "nll") not in ("nll", None), REFUSED,
                "build", "the loss section would silently replace TRL's loss_type",
                {"loss.strategy": "focal", "training.loss_type": "dft"}),
    Combination("loss-with-label-smoothing", "a loss: strategy with training.label_smoothing_factor",
                lambda s: _custom_loss(s) and bool(getattr(s.args, "label_smoothing_factor", 0.0)), REFUSED,
                "build", "set loss.label_smoothing instead",
                {"loss.strategy": "focal", "training.label_smoothing_factor": 0.1}),
    Combination("autotune-sharded", "autotune: enabled under FSDP or DeepSpeed",
                lambda s: _on(s, "autotune") and _sharded(s), REFUSED, "build",
                "the autotune probes do not model sharded memory yet",
                {"autotune.enabled": True, "autotune.max_memory": "1GB", "training.fsdp": "full_shard"}),
    Combination("autotune-cpu-no-budget", "autotune: enabled on a machine without an accelerator and no "
                "autotune.max_memory", lambda s: _on(s, "autotune") and not s.accelerator
                and not _get(s, "autotune.max_memory"), REFUSED, "build",
                "free memory cannot be read on the CPU; give autotune.max_memory", {"autotune.enabled": True}),
    Combination("lp-lora-tied-head", "freeze.schedule lp_lora on a model whose head is tied to its embeddings",
                lambda s: _on(s, "freeze") and _get(s, "freeze.schedule") == "lp_lora" and _tied(s), REFUSED,
                "build", "LP-LoRA probes the head alone, and a tied head is the embedding matrix too",
                {"freeze.enabled": True, "freeze.schedule": "lp_lora", "freeze.every_n_steps": 2}),
    Combination("assistant-loss-plain-text", "training.assistant_only_loss with plain-text rows (no chat turns)",
                lambda s: bool(getattr(s.args, "assistant_only_loss", False)) and s.data_format == "text", REFUSED,
                "build", "TRL needs conversational rows to find the assistant turns",
                {"training.assistant_only_loss": True, "data.path": "rows:text"}),
    Combination("padding-free-unpacked", "training.padding_free without data.packing (and a max_length)",
                lambda s: bool(getattr(s.args, "padding_free", False)) and not getattr(s.args, "packing", False)
                and getattr(s.args, "max_length", None) is not None, REFUSED, "build",
                "TRL cannot enforce max_length on unpacked padding-free rows", {"training.padding_free": True}),
    Combination("ema-fsdp1", "ema: enabled under FSDP version 1", lambda s: _on(s, "ema") and _fsdp1(s), REFUSED,
                "train", "FSDP1 flattens parameters; forge.ema supports FSDP2",
                {"ema.enabled": True, "training.fsdp": "full_shard", "training.fsdp_config": {"version": 1}}),
    Combination("freeze-schedule-sharded", "a freeze: schedule under FSDP or DeepSpeed",
                lambda s: _on(s, "freeze") and bool(_get(s, "freeze.schedule")) and _sharded(s), UNSUPPORTED,
                "train", "trainability changes are not seen by sharded optimizers (see docs/distributed.md)",
                {**_FREEZE_SCHEDULE, "training.fsdp": "full_shard"}),
    Combination("ema-eval-without-eval", "ema.eval_with_ema with evaluation off",
                lambda s: _on(s, "ema") and bool(_get(s, "ema.eval_with_ema"))
                and str(getattr(getattr(s.args, "eval_strategy", "no"), "value", getattr(s.args, "eval_strategy",
                                                                                         "no"))) == "no"
                and not any(_get(s, f"data.{k}") for k in ("eval_path", "eval_split", "eval_fraction")),
                UNSUPPORTED, "build", "no evaluation runs, so there is no EMA evaluation either",
                {"ema.enabled": True, "ema.eval_with_ema": True}),
)

_WHERE = {"preset": "the preset is refused when it loads", "build": "forge train stops after loading the model",
          "train": "training stops when it starts"}


def matching(setup: Setup) -> list[Combination]:
    """The rows of :data:`COMBINATIONS` that apply to ``setup``."""
    return [c for c in COMBINATIONS if c.applies(setup)]


def check_combinations(setup: Setup) -> Check:
    """FAIL for a refused combination, WARN for an unsupported one, OK when none applies."""
    found = matching(setup)
    data = {"matched": [c.key for c in found]}
    if not found:
        return Check("combination", OK, f"none of the {len(COMBINATIONS)} known refused or unsupported feature "
                     "combinations applies", data=data)
    refused = [c for c in found if c.verdict == REFUSED]
    lines = [f"{c.summary}: {c.reason} ({_WHERE[c.stage] if c.verdict == REFUSED else 'not supported'})"
             for c in refused or found]
    status = FAIL if refused else WARN
    return Check("combination", status, "; ".join(lines), data=data)
