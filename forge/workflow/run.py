"""A finished run's directory as the workflow commands see it, and its models loaded for use.

``forge train`` leaves the model (or a PEFT adapter), the tokenizer and ``forge_preset.yaml``
in its output directory. From those, :func:`read_run` tells what the run trained (an adapter
of which base, quantized or not, which method) and the loaders build:

* the **trained** model: the saved full model, or the base (quantized as in training unless
  asked not to be) with the adapter on top, unmerged;
* the **starting** model (``--base``): the model the run started from, i.e. the base of an
  adapter run or the preset's ``model.name_or_path`` of a full fine-tune (itself possibly an
  adapter of an earlier run). DPO calls this the reference model.

Any directory holding a plain HF model (e.g. ``forge merge`` output) reads as a run without a
preset.

Example:
    >>> run = read_run("outputs/lora")
    >>> model, tokenizer = load_trained(run), load_run_tokenizer(run)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge.core.paths import PRESET_FILE
from forge.errors import ForgeError


@dataclass
class RunDir:
    """What a run directory holds.

    Attributes:
        path: the directory.
        preset: the run's resolved preset (``forge_preset.yaml``), or None for a plain model dir.
        adapter_base: the base model of the saved adapter, or None when a full model is saved.
    """

    path: Path
    preset: Any
    adapter_base: str | None

    @property
    def model_config(self) -> Any:
        """The ``model:`` section the run loaded with (defaults for a directory without a preset)."""
        from forge.config.schema import ModelConfig

        return self.preset.model if self.preset is not None else ModelConfig(name_or_path=str(self.path))

    @property
    def quantization(self) -> dict[str, Any] | None:
        """The ``model.quantization`` the run trained with (QLoRA), or None."""
        return self.model_config.quantization

    @property
    def method(self) -> str:
        return self.preset.method if self.preset is not None else "sft"

    @property
    def start(self) -> str:
        """The model the run started from (``--base``; DPO's reference)."""
        if self.preset is not None:
            return self.preset.model.name_or_path
        if self.adapter_base is not None:
            return self.adapter_base
        raise ForgeError(f"{self.path}: a plain model directory without {PRESET_FILE}: "
                         "there is no record of the model it started from (--base)")


def read_run(run_dir: str | Path) -> RunDir:
    """Read a run directory (cheap: configs only, no weights).

    Raises:
        ForgeError: the directory does not exist or holds neither a model nor an adapter.
    """
    from forge.config.loader import load_preset
    from forge.recipes.model import ADAPTER_CONFIG, adapter_base

    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise ForgeError(f"run directory '{run_dir}' not found")
    if not (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        raise ForgeError(f"{run_dir}: no model or adapter here (no config.json or {ADAPTER_CONFIG}); "
                         "is it a forge train output directory?")
    preset = load_preset(str(path / PRESET_FILE)) if (path / PRESET_FILE).is_file() else None
    return RunDir(path=path, preset=preset, adapter_base=adapter_base(str(path)))


def load_run_tokenizer(run: RunDir) -> Any:
    """The tokenizer saved with the run (it carries the chat template the run trained with)."""
    from forge.recipes.model import load_tokenizer

    saved = any((run.path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    source = str(run.path) if saved else (run.adapter_base or run.start)
    return load_tokenizer(dataclasses.replace(run.model_config, name_or_path=source, tokenizer=None))


def load_plain(run: RunDir, name_or_path: str, quantized: bool, dtype: str | None) -> Any:
    """``name_or_path`` loaded as the run loads models (its ``model:`` section), without PEFT on
    top; an adapter directory given here is merged into its base. ``quantized``: apply the run's
    ``model.quantization``."""
    from forge.recipes.model import load_model

    cfg = dataclasses.replace(run.model_config, name_or_path=name_or_path,
                              dtype=dtype or run.model_config.dtype)
    quant = None
    if quantized and run.quantization:
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(**run.quantization)
    return load_model(cfg, quant, None)


def load_trained(run: RunDir, quantized: bool = True, dtype: str | None = None) -> Any:
    """The model the run trained, in eval mode: a ``PeftModel`` (adapter unmerged) or the full model.

    Args:
        run: from :func:`read_run`.
        quantized: load a QLoRA run's base in 4-bit, as it trained (False: unquantized).
        dtype: weight dtype (``float32``, ``bfloat16``, ...); None: the run's ``model.dtype``.
    """
    if run.adapter_base is None:
        return _to_device(load_plain(run, str(run.path), False, dtype)).eval()
    from peft import PeftModel

    base = load_plain(run, run.adapter_base, quantized, dtype)
    return _to_device(PeftModel.from_pretrained(base, str(run.path))).eval()


def load_start(run: RunDir, quantized: bool = True, dtype: str | None = None) -> Any:
    """The model the run started from (see :attr:`RunDir.start`), in eval mode."""
    return _to_device(load_plain(run, run.start, quantized, dtype)).eval()


def device() -> Any:
    """Where the workflow commands run a model: the first GPU when there is one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to_device(model: Any) -> Any:
    target = device()
    if target.type != "cpu" and next(model.parameters()).device != target:
        model.to(target)
    return model
