"""Load YAML presets: shipped ones by name, a user's by path, with ``extends`` and overrides.

Example:
    >>> import forge
    >>> preset = forge.load_preset("qlora", overrides=["training.learning_rate=1e-4"])
    >>> args = preset.training_args()          # trl.SFTConfig
    >>> lora = preset.peft_config()            # peft.LoraConfig
    >>> bnb = preset.quantization_config()     # transformers.BitsAndBytesConfig
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from forge.config.schema import (
    DataConfig,
    ModelConfig,
    feature_config_class,
    training_config_class,
    validate,
)
from forge.core.safeyaml import MAX_BYTES, load_yaml
from forge.core.typecheck import did_you_mean
from forge.errors import ConfigError, ForgeError

# Shortcuts of `forge train` and what they set.
SHORTCUTS = {
    "model": "model.name_or_path",
    "data": "data.path",
    "output_dir": "training.output_dir",
    "max_steps": "training.max_steps",
}


def shortcut_overrides(option: str, value: Any) -> list[tuple[str, Any]]:
    """The preset keys one shortcut sets. ``--model`` names a whole checkpoint: a path ending
    in ``.gguf`` sets ``model.name_or_path`` (its folder) and ``model.gguf_file`` (its name);
    any other value clears a ``gguf_file`` the preset had, which would not be in that model.

    Example:
        >>> shortcut_overrides("model", "/models/smol/model.Q4_1.gguf")
        [('model.name_or_path', '/models/smol'), ('model.gguf_file', 'model.Q4_1.gguf')]
    """
    if option != "model":
        return [(SHORTCUTS[option], value)]
    path = Path(str(value)).expanduser()
    if path.suffix.lower() == ".gguf":
        return [("model.name_or_path", str(path.parent)), ("model.gguf_file", path.name)]
    return [("model.name_or_path", value), ("model.gguf_file", None)]


def presets_dir() -> Path:
    """The folder holding the shipped presets (inside the installed package)."""
    return Path(__file__).parent / "presets"


def list_presets() -> dict[str, str]:
    """Shipped preset names with their one-line descriptions.

    Example:
        >>> sorted(forge.list_presets())[:2]
        ['demo', 'dpo']
    """
    out = {}
    for path in sorted(presets_dir().glob("*.yaml")):
        raw = _read_yaml(path)
        out[path.stem] = str(raw.get("description", "")).strip()
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ForgeError(f"{path}: {path.stat().st_size} bytes is more than a preset can be "
                             f"({MAX_BYTES}); is it the right file?")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ForgeError(f"preset file '{path}' not found") from None
    except UnicodeDecodeError as err:
        raise ForgeError(f"{path}: not UTF-8 text (byte {err.start}); save the preset as UTF-8") from None
    except OSError as err:
        raise ForgeError(f"cannot read preset file '{path}': {err.strerror}") from None
    try:
        data = load_yaml(text, str(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ForgeError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ForgeError(f"{path}: a preset must be a YAML mapping, got {type(data).__name__}")
    return data


def _locate(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A preset argument as a file: an existing path first, else a shipped preset name."""
    candidate = Path(name_or_path).expanduser()
    if relative_to is not None and not candidate.is_absolute():
        candidate = relative_to / candidate
    if candidate.is_file():
        return candidate.resolve()
    shipped = presets_dir() / f"{Path(name_or_path).stem}.yaml"
    looks_like_name = "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml"))
    if looks_like_name and shipped.is_file():
        return shipped
    names = list(list_presets())
    hint = did_you_mean(name_or_path, names) if looks_like_name else ""
    raise ForgeError(
        f"preset '{name_or_path}' not found: not a file, and not one of the shipped presets "
        f"({', '.join(names)}){hint}"
    )


def _merge(base: dict, update: dict, origins: dict[str, str], source: str, prefix: str = ""):
    """Deep-merge ``update`` into ``base`` in place; mappings merge, everything else replaces."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, origins, source, dotted + ".")
        elif isinstance(value, dict) and type(base.get(key)) in (int, float):
            continue  # `training: 5` plus `--set training.x=1`: keep the 5 for validation to report
        else:
            base[key] = copy.deepcopy(value)
            origins[dotted] = source
            # Keys below a replaced value now come from this source too.
            for k in [k for k in origins if k.startswith(dotted + ".")]:
                origins[k] = source


def _resolve(path: Path, origins: dict[str, str], chain: tuple[Path, ...] = ()) -> dict:
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise ForgeError(f"{path}: extends: preset extends itself ({cycle})")
    raw = _read_yaml(path)
    parent = raw.pop("extends", None)
    merged: dict[str, Any] = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise ForgeError(f"{path}: extends: expected a preset name or path, got {parent!r}")
        try:
            parent_path = _locate(parent, relative_to=path.parent)
        except ForgeError as err:
            raise ForgeError(f"{path}: extends: {err}") from None
        merged = _resolve(parent_path, origins, (*chain, path))
    _merge(merged, raw, origins, str(path))
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.learning_rate=1e-4"`` -> ``("training.learning_rate", 1e-4)``.

    The value is read as a YAML scalar (or flow list/mapping), so ``true``, ``null``,
    ``[wandb, mlflow]`` and numbers mean what they mean in a preset file.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ForgeError(f"--set {text!r}: expected KEY=VALUE, e.g. training.learning_rate=1e-4")
    try:
        parsed = load_yaml(value, f"--set {key}") if value.strip() else None
    except yaml.YAMLError:
        raise ForgeError(f"--set {text!r}: the value is not valid YAML") from None
    if isinstance(parsed, str) and _is_number(parsed):
        parsed = float(parsed)  # YAML 1.1 reads 1e-4 as a string
    return key, parsed


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _nest(dotted: str, value: Any) -> dict:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


class Preset:
    """A resolved, validated preset, and the real HF/TRL/PEFT config objects it describes.

    Create it with :func:`load_preset`. Sections are plain dicts under ``preset.config``.
    """

    def __init__(self, name: str, source: str, config: dict[str, Any],
                 origins: dict[str, str] | None = None):
        self.name = name
        self.source = source
        self.config = config
        self.origins = dict(origins or {})  # dotted key -> the file (or "--set") that set it

    @property
    def method(self) -> str:
        """``"sft"`` or ``"dpo"``."""
        return self.config["method"]

    @property
    def model(self) -> ModelConfig:
        """The ``model:`` section with defaults filled in."""
        return ModelConfig(**self.config["model"])

    @property
    def data(self) -> DataConfig:
        """The ``data:`` section with defaults filled in."""
        return DataConfig(**self.config["data"])

    def feature(self, section: str) -> Any:
        """A forge feature section (``ema``, ``freeze``, ...) as its dataclass, or None."""
        if section not in self.config:
            return None
        return feature_config_class(section)(**self.config[section])

    def get_args_dict(self) -> dict[str, Any]:
        """Keyword arguments of the TRL config, as a plain dict (needs no accelerate).

        Example:
            >>> forge.load_preset("lora").get_args_dict()["learning_rate"]
            0.0002
        """
        args = dict(self.config["training"])
        data = self.data
        args["max_length"] = data.max_length
        if self.method == "sft":
            args["packing"] = data.packing
        args.setdefault("output_dir", f"outputs/{self.name}")
        if self.config["trackers"]:
            args["report_to"] = list(self.config["trackers"])  # the tracker names
        args.setdefault("report_to", "none")
        return args

    def training_args(self) -> Any:
        """The real ``trl.SFTConfig`` (method sft) or ``trl.DPOConfig`` (method dpo).

        Unlike :meth:`get_args_dict`, this fills in the defaults that depend on the
        hardware, where the preset leaves them unset. On a machine with no accelerator:
        ``bf16`` off (TRL turns it on by default, which fails there) and ``use_cpu`` on
        (without it, accelerate does not see a ``torchrun`` launch on CPU as distributed
        and each process trains alone).

        Raises:
            ForgeError: the arguments contradict each other (TrainingArguments' own checks).
        """
        args = self.get_args_dict()
        if "bf16" not in args and "fp16" not in args and not _bf16_accelerator():
            args["bf16"] = False
        # Not with DeepSpeed, which accelerate drops under use_cpu (on CPU: DS_ACCELERATOR=cpu).
        if not _any_accelerator() and not _deepspeed(args):
            args.setdefault("use_cpu", True)
        try:
            made = training_config_class(self.method)(**args)
        except (ValueError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ForgeError(f"{self._blame(first)}: training: {first}") from None
        if _deepspeed(args) and not _any_accelerator():
            from forge.core.distributed import count_cpu_deepspeed_ranks

            count_cpu_deepspeed_ranks()  # accelerate counts one process of a CPU DeepSpeed run
        return made

    def _blame(self, message: str) -> str:
        """Where the training keys a TrainingArguments error names (or whose values it
        quotes) were set: ``--set`` for a bad ``--set`` value, not the preset it overrides."""
        import re

        sources = []
        for key, value in self.config["training"].items():
            named = re.search(rf"\b{re.escape(key)}\b", message)
            quoted = isinstance(value, str) and value and re.search(rf"\b{re.escape(value)}\b", message)
            source = self.origins.get(f"training.{key}")
            if (named or quoted) and source and source not in sources:
                sources.append(source)
        return ", ".join(sources) or self.source

    def peft_config(self) -> Any:
        """A ``peft.LoraConfig``, or None for a full fine-tune."""
        if self.config["peft"] is None:
            return None
        from peft import LoraConfig

        kwargs = dict(self.config["peft"])
        kwargs.setdefault("task_type", "CAUSAL_LM")
        return LoraConfig(**kwargs)

    def quantization_config(self) -> Any:
        """A ``transformers.BitsAndBytesConfig``, or None when the model is not quantized."""
        quant = self.config["model"].get("quantization")
        if not quant:
            return None
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(**quant)

    def tracker_specs(self) -> list[Any]:
        """The ``trackers:`` section as :mod:`forge.trackers` specs (one per tracker)."""
        from forge.trackers.config import parse_trackers

        return parse_trackers(self.config["trackers"])[0]

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved preset: model and data with every default filled in."""
        out = copy.deepcopy(self.config)
        out["model"] = dataclasses.asdict(self.model)
        out["data"] = dataclasses.asdict(self.data)
        return out

    def to_yaml(self) -> str:
        """The fully resolved preset as YAML, loadable again with :func:`load_preset`."""
        header = f"# Resolved forge preset '{self.name}' (from {self.source}).\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False)


def _bf16_accelerator() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def _deepspeed(args: dict[str, Any]) -> bool:
    """DeepSpeed asked for in the preset or by ``accelerate launch --use_deepspeed``."""
    import os

    return bool(args.get("deepspeed")) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def _any_accelerator() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    for name in ("xpu", "mps", "npu"):
        backend = getattr(torch, name, None) or getattr(torch.backends, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return True
    return False


def load_preset(
    name_or_path: str = "demo",
    overrides: list[str] | dict[str, Any] | None = None,
) -> Preset:
    """Load a shipped preset by name, or a YAML file by path, and validate it.

    Args:
        name_or_path: ``"sft"``, ``"lora"``, ``"qlora"``, ``"dpo"``, ``"demo"``, or a path
            to a YAML file (which may ``extends:`` a shipped preset or another file).
        overrides: ``["training.learning_rate=1e-4", ...]`` (values read as YAML), or a
            dict of dotted keys (``{"training.max_steps": 10}``) or nested sections.

    Returns:
        A :class:`Preset`.

    Raises:
        ForgeError: the preset cannot be found or read.
        ConfigError: unknown keys or wrong types, every one listed.

    Example:
        >>> preset = forge.load_preset("lora", {"training.max_steps": 10})
        >>> trainer = trl.SFTTrainer(model, args=preset.training_args(),
        ...                          peft_config=preset.peft_config(), train_dataset=ds)
    """
    path = _locate(name_or_path)
    origins: dict[str, str] = {}
    merged = _resolve(path, origins)
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        items = list(overrides.items())
    elif overrides:
        items = [parse_override(o) for o in overrides]
    for key, value in items:
        _merge(merged, _nest(key, value), origins, "--set")
    config = validate(merged, origins, str(path))
    name = path.stem
    return Preset(name=name, source=str(path), config=config, origins=origins)


__all__ = ["ConfigError", "Preset", "list_presets", "load_preset", "parse_override",
           "presets_dir", "shortcut_overrides", "SHORTCUTS"]
