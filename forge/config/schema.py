"""The preset schema: one typed dataclass per section, and strict validation of a preset dict.

A preset is a YAML mapping with these sections (see ``docs/presets.md``):

* ``method``: one of :data:`METHODS` (``sft``, ``dpo``, ``orpo``, ``cpo``, ``kto``; see
  :mod:`forge.config.methods`);
* ``model`` (:class:`ModelConfig`), ``data`` (:class:`DataConfig`);
* ``peft``: keyword arguments of ``peft.LoraConfig`` (``null`` for a full fine-tune);
* ``training``: fields of the method's TRL config (``SFTConfig``, ``DPOConfig``, ...);
* ``trackers``: names of trackers to report to;
* forge feature sections (``ema``, ``freeze``, ``loss``, ``monitor``), each validated against
  the config dataclass of the module that implements it.

Every problem is collected and reported at once, naming the source file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any

from forge.config.methods import METHODS, config_class, refusals
from forge.config.outputs import output_path_problems
from forge.config.ranges import out_of_range, unindexed
from forge.core.typecheck import coerce, describe, did_you_mean, shown

DTYPES = ("auto", "float32", "bfloat16", "float16")
DATA_FORMATS = ("messages", "prompt_completion", "alpaca", "text", "preference", "implicit_preference",
                "unpaired_preference")
STOPPING_STRATEGIES = ("first_exhausted", "all_exhausted", "all_exhausted_without_replacement")


@dataclass
class ModelConfig:
    """The ``model:`` section: what to load and how."""

    name_or_path: str = field(
        default="builtin:tiny-llama",
        metadata={"help": "Hub name or local directory of the model; `builtin:tiny-llama` is "
                  "forge's bundled random-initialised demo model (works offline), "
                  "`builtin:smollm2-135m` a real one once `forge models fetch smollm2-135m` ran."},
    )
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "A GGUF checkpoint (llama.cpp's one-file format) in name_or_path, by "
                  "file name: loaded dequantized to a float model, with its tokenizer. Needs "
                  "`pip install 'transformers-forge[gguf]'`; `--model dir/x.gguf` sets both keys."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weight dtype: auto (what the checkpoint says), float32, bfloat16 "
                  "or float16."},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: sdpa, eager, flash_attention_2, ... "
                  "(null: the transformers default)."},
    )
    quantization: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Keyword arguments of transformers.BitsAndBytesConfig, e.g. "
                  "{load_in_4bit: true, bnb_4bit_quant_type: nf4}; null: no quantization."},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer name or path when it differs from the model's."},
    )
    revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) to load."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run modelling code shipped with a Hub model. Off unless you trust it."},
    )


@dataclass
class DataConfig:
    """The ``data:`` section: where the examples are and how to read them."""

    path: str = field(
        default="builtin:demo-sft",
        metadata={"help": "A .jsonl/.json/.csv/.parquet file or a directory saved by "
                  "`datasets`; `builtin:demo-sft` / `builtin:demo-dpo` / `builtin:demo-text` are "
                  "forge's demo sets."},
    )
    format: str | None = field(
        default=None,
        metadata={"help": "messages | prompt_completion | alpaca | text | preference | "
                  "unpaired_preference; null: detected from the columns."},
    )
    split: str = field(
        default="train", metadata={"help": "Split to train on, for a saved DatasetDict."}
    )
    eval_path: str | None = field(
        default=None, metadata={"help": "Separate evaluation file or directory."}
    )
    eval_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on, for a saved DatasetDict."}
    )
    eval_fraction: float | None = field(
        default=None,
        metadata={"help": "Hold out this fraction of the training rows for evaluation "
                  "(seeded by training.seed)."},
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training rows (quick trials; with "
                                "sources, of the mixed set)."}
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Truncate tokenised examples to this many tokens (SFT and DPO)."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "SFT only: pack several examples into each max_length sequence "
                  "(padding-free, position ids restart per example: no attention across them)."},
    )
    columns: dict[str, str] | None = field(
        default=None,
        metadata={"help": "Rename columns before the format is detected, e.g. "
                  "{question: prompt, answer: completion}."},
    )
    sources: list[dict[str, Any]] | None = field(
        default=None,
        metadata={"help": "Several sources mixed into one training set, each {path, format, split, "
                  "max_samples, weight, columns}; see docs/data.md."},
    )
    stopping_strategy: str = field(
        default="first_exhausted",
        metadata={"help": "When mixing sources stops (datasets.interleave_datasets): "
                  "first_exhausted, all_exhausted or all_exhausted_without_replacement."},
    )


def has_eval(data: DataConfig) -> bool:
    """Whether a ``data:`` section asks for an evaluation set."""
    return bool(data.eval_path or data.eval_split or data.eval_fraction)


# Forge feature sections live in the module that implements the feature.
# `autotune` is applied before the others (it changes the batch they see); see forge.recipes.runner.
FEATURE_SECTIONS: dict[str, str] = {
    "autotune": "forge.autotune.config:AutotuneConfig",
    "ema": "forge.ema.config:EMAConfig",
    "freeze": "forge.layers.config:FreezeConfig",
    "loss": "forge.loss.config:LossConfig",
    "monitor": "forge.monitor.config:MonitorConfig",
}
TOP_LEVEL = ("extends", "description", "method", "model", "data", "peft", "training",
             "trackers", *FEATURE_SECTIONS)
# Keys forge sets from other sections; setting them under `training:` would be ambiguous.
TRAINING_KEYS_ELSEWHERE = {
    "max_length": "data.max_length",
    "packing": "data.packing",
    "model_init_kwargs": "model",
    "trust_remote_code": "model.trust_remote_code",
    "resume_from_checkpoint": "use `forge train --resume` instead (it checks the checkpoint is complete)",
}


def feature_config_class(section: str) -> type:
    """Import the dataclass that validates a forge feature section, e.g. ``"ema"``."""
    module_name, cls_name = FEATURE_SECTIONS[section].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def training_config_class(method: str) -> type:
    """TRL's config class for a method: ``SFTConfig``, ``DPOConfig``, ``KTOConfig``, ..."""
    return config_class(method)


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: judge only what we can
        return {f.name: f.type for f in dataclasses.fields(cls)}


class _Checker:
    """Collects problems while walking a preset; ``where(key)`` names the file a key came from."""

    def __init__(self, origins: dict[str, str], default_source: str):
        self.origins = origins
        self.default_source = default_source
        self.problems: list[str] = []

    def where(self, key: str) -> str:
        parts = unindexed(key).split(".")
        for i in range(len(parts), 0, -1):
            src = self.origins.get(".".join(parts[:i]))
            if src:
                return src
        return self.default_source

    def add(self, key: str, message: str) -> None:
        self.problems.append(f"{self.where(key)}: {key}: {message}")

    def fields(self, prefix: str, values: Any, hints: dict[str, Any]) -> dict[str, Any]:
        """Check a mapping against field type hints; return it with lossless coercions."""
        if values is None:
            return {}
        if not isinstance(values, dict):
            self.add(prefix, f"expected a mapping, got {type(values).__name__}")
            return {}
        out = {}
        for key, value in values.items():
            dotted = f"{prefix}.{key}"
            if key not in hints:
                self.add(dotted, "unknown key" + did_you_mean(str(key), hints))
                continue
            ok, value = coerce(value, hints[key])
            if not ok:
                self.add(dotted, f"expected {describe(hints[key])}, got {shown(value)}")
                continue
            problem = out_of_range(dotted, value)
            if problem:
                self.add(dotted, problem)
                continue
            out[key] = value
        return out


def _section_on(preset: dict[str, Any], out: dict[str, Any], key: str) -> bool:
    """Whether a preset turns on ``key``: a section (``loss``, ``freeze: {enabled: true}``) or a
    checked flag (``data.packing``)."""
    if key == "data.packing":
        return bool(out["data"].get("packing"))
    value = preset.get(key)
    if key == "loss":
        return value is not None  # the loss section has no `enabled`: present means on
    return value is True or isinstance(value, dict) and bool(value.get("enabled"))


def validate(preset: dict[str, Any], origins: dict[str, str], source: str) -> dict[str, Any]:
    """Validate a merged preset dict and return it with values coerced to their types.

    Args:
        preset: the preset after ``extends`` and overrides were merged.
        origins: dotted key -> file (or ``--set``) that last set it, for messages.
        source: the preset's own file, named when a key has no recorded origin.

    Raises:
        ConfigError: listing every problem found, one per line.
    """
    from forge.errors import ConfigError

    check = _Checker(origins, source)
    out: dict[str, Any] = {}
    for key in preset:
        if key not in TOP_LEVEL:
            check.add(str(key), "unknown section" + did_you_mean(str(key), TOP_LEVEL))

    method = preset.get("method", "sft")
    if method not in METHODS:
        check.add("method", f"expected one of {', '.join(METHODS)}, got {shown(method)}")
        method = "sft"
    out["method"] = method
    if "description" in preset:
        out["description"] = str(preset["description"])

    out["model"] = check.fields("model", preset.get("model"), _hints(ModelConfig))
    dtype = out["model"].get("dtype")
    if dtype is not None and dtype not in DTYPES:
        check.add("model.dtype", f"expected one of {', '.join(DTYPES)}, got {dtype!r}")
    quant = out["model"].get("quantization")
    if quant:
        from transformers import BitsAndBytesConfig

        allowed = [p for p in inspect.signature(BitsAndBytesConfig.__init__).parameters
                   if p not in ("self", "kwargs")]
        for key in quant:
            if key not in allowed:
                check.add(f"model.quantization.{key}", "unknown key" + did_you_mean(key, allowed))

    out["data"] = check.fields("data", preset.get("data"), _hints(DataConfig))
    fmt = out["data"].get("format")
    if fmt is not None and fmt not in DATA_FORMATS:
        check.add("data.format", f"expected one of {', '.join(DATA_FORMATS)}, got {fmt!r}")
    stopping = out["data"].get("stopping_strategy")
    if stopping is not None and stopping not in STOPPING_STRATEGIES:
        check.add("data.stopping_strategy",
                  f"expected one of {', '.join(STOPPING_STRATEGIES)}, got {stopping!r}")
    frac = out["data"].get("eval_fraction")
    if frac is not None and not 0.0 < frac < 1.0:
        check.add("data.eval_fraction", f"expected a fraction between 0 and 1, got {frac!r}")
    if out["data"].get("sources") is not None:
        from forge.config.sources import check_sources

        out["data"]["sources"] = check_sources(check, out["data"]["sources"], DATA_FORMATS)
    for key, reason in refusals(method).items():
        if _section_on(preset, out, key):
            check.add(key, reason)

    if preset.get("peft") is not None:
        from peft import LoraConfig

        out["peft"] = check.fields("peft", preset["peft"], _hints(LoraConfig))
    else:
        out["peft"] = None
    if quant and out["peft"] is None:
        check.add("model.quantization",
                  "a quantized model cannot be fully fine-tuned; add a `peft:` section (QLoRA)")

    training_cls = training_config_class(method)
    training = preset.get("training") or {}
    if isinstance(training, dict):
        for key, moved_to in TRAINING_KEYS_ELSEWHERE.items():
            if key in training:
                check.add(f"training.{key}", moved_to if moved_to.startswith("use ")
                          else f"set {moved_to} instead")
        training = {k: v for k, v in training.items() if k not in TRAINING_KEYS_ELSEWHERE}
    out["training"] = check.fields("training", training, _hints(training_cls))

    from forge.trackers.config import parse_trackers, specs_to_config

    specs, problems = parse_trackers(preset.get("trackers"))
    for problem in problems:
        key, _, message = problem.partition(": ")
        check.add(key, message)
    out["trackers"] = specs_to_config(specs)
    if out["training"].get("eval_strategy", "no") != "no" and not has_eval(DataConfig(**out["data"])):
        check.add("training.eval_strategy", f"{out['training']['eval_strategy']!r} needs evaluation "
                  "data: set data.eval_path, data.eval_split or data.eval_fraction (or 'no')")

    for section in FEATURE_SECTIONS:
        value = preset.get(section)
        if value is None:
            continue
        if isinstance(value, bool):  # `ema: true` is short for `ema: {enabled: true}`
            value = {"enabled": value}
        cls = feature_config_class(section)
        fields = check.fields(section, value, _hints(cls))
        try:  # the section's own cross-field checks (e.g. a decay outside (0, 1))
            cls(**fields)
        except (ValueError, TypeError) as err:
            for line in str(err).strip().splitlines() or [type(err).__name__]:
                check.add(section, line.strip().lstrip("-• ").strip())
        out[section] = fields

    for key, problem in output_path_problems(out, check.where):
        check.add(key, problem)
    if check.problems:
        raise ConfigError(check.problems)
    return out
