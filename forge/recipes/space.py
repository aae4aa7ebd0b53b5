"""What one checkpoint of a run needs on disk, from the model's safetensors headers (read
without loading a weight), and a first look at those files, so a cut-short or corrupt
weights file is one line naming it before anything loads.

A safetensors file is 8 bytes of header length, a JSON header giving each tensor's dtype,
shape and byte range, then the data: the header alone gives the parameter count, and a file
shorter than the ranges it lists is cut short.

Example:
    >>> need = checkpoint_bytes(RunConfig.from_preset(forge.load_preset("demo")))
    >>> need > 3 * 2**20  # the demo model's weights and Adam's two moments
    True
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from forge.errors import ForgeError

_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2,
                "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1,
                "F8_E5M2": 1}
_TRAIN_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit
# Small files a checkpoint copies from the model directory (config, tokenizer, template).
_SMALL_FILES = ("*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken")
# PEFT's default LoRA targets when `target_modules` is not set (the common architectures).
_DEFAULT_TARGETS = ("q_proj", "v_proj", "query", "value", "c_attn", "query_key_value")


def read_safetensors_header(path: str | Path, hint: str = "") -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file describes (``{name: {dtype, shape, data_offsets}}``).

    Raises:
        ForgeError: the file is corrupt, or shorter than its header says (cut short).
    """
    path = Path(path)
    size = path.stat().st_size
    corrupt = f"{path}: corrupt safetensors file"
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > _MAX_HEADER or 8 + length > size:
            raise ForgeError(f"{corrupt} (no valid header in its {size} bytes: cut short?){hint}")
        try:
            header = json.loads(fh.read(length).decode("utf-8"))
        except ValueError:
            raise ForgeError(f"{corrupt} (its header is not valid JSON){hint}") from None
    if not isinstance(header, dict):
        raise ForgeError(f"{corrupt} (its header is not a JSON object){hint}")
    tensors, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            shape = [int(x) for x in info["shape"]]
            str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise ForgeError(f"{corrupt} (tensor {name!r} is described wrongly){hint}") from None
        if not 0 <= start <= stop:
            raise ForgeError(f"{corrupt} (tensor {name!r} has a bad byte range){hint}")
        end = max(end, stop)
        tensors[name] = {"dtype": info["dtype"], "shape": shape, "data_offsets": [start, stop]}
    if 8 + length + end > size:
        raise ForgeError(f"{path}: cut short: {size} bytes, but its header describes "
                         f"{8 + length + end}; copy or download it again{hint}")
    return tensors


def weight_files(name_or_path: str, revision: str | None = None) -> list[Path] | None:
    """The safetensors files of a local model directory, or of a Hub model in the local
    cache (never downloads); None when they cannot be found here."""
    from forge.recipes.model import resolve_model_path

    local = Path(resolve_model_path(name_or_path)).expanduser()
    if local.is_dir():
        return sorted(local.glob("*.safetensors")) or None
    try:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(name_or_path, "model.safetensors.index.json", revision=revision)
        if isinstance(index, str):
            names = sorted(set(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"].values()))
        else:
            names = ["model.safetensors"]
        found = [try_to_load_from_cache(name_or_path, n, revision=revision) for n in names]
    except Exception:  # not a Hub id, an unreadable index: no estimate, loading says more
        return None
    return [Path(f) for f in found] if all(isinstance(f, str) for f in found) else None


def _numel(info: dict[str, Any]) -> int:
    return math.prod(info["shape"])


def lora_parameters(tensors: dict[str, dict[str, Any]], peft: Any) -> int:
    """How many parameters LoRA adds for ``peft`` (a ``LoraConfig``) to a model's weights."""
    targets, rank = peft.target_modules, int(peft.r)

    def targeted(module: str) -> bool:
        leaf = module.rsplit(".", 1)[-1]
        if targets is None:
            return leaf in _DEFAULT_TARGETS
        if isinstance(targets, str):
            if targets == "all-linear":
                return not any(x in module for x in ("lm_head", "embed", "wte", "wpe"))
            return re.fullmatch(targets, module) is not None
        return leaf in targets or any(module.endswith("." + t) for t in targets)

    total = 0
    for name, info in tensors.items():
        if name.endswith(".weight") and len(info["shape"]) == 2 and targeted(name[:-7]):
            total += rank * sum(info["shape"])
    return total


def checkpoint_bytes(config: Any) -> int | None:
    """About what one checkpoint of a run takes on disk; None when the weights are not here.

    The trained weights (all of them, or the LoRA adapters in float32), Adam's two moments
    of the same size, an EMA copy when the ``ema`` section is on, the model's small files,
    and 5% plus 1 MB for the rest (RNG and trainer state).

    Args:
        config: the run's :class:`~forge.recipes.phases.RunConfig`.

    Raises:
        ForgeError: a weights file is corrupt or cut short.
    """
    from forge.recipes.model import adapter_base

    model = config.model
    base = adapter_base(model.name_or_path)
    files = weight_files(base or model.name_or_path, model.revision)
    if not files:
        return None
    tensors: dict[str, dict[str, Any]] = {}
    for file in files:
        tensors.update(read_safetensors_header(file))
    adapter = Path(model.name_or_path).expanduser() / "adapter_model.safetensors"
    if config.peft is None:
        per = _TRAIN_BYTES.get(model.dtype)
        trained = sum(_numel(i) * (per or _DTYPE_BYTES.get(i["dtype"], 4)) for i in tensors.values())
    elif base is not None and adapter.is_file():
        trained = sum(_numel(i) * 4 for i in read_safetensors_header(adapter).values())
    else:
        trained = lora_parameters(tensors, config.peft) * 4
    copies = 3 + ("ema" in config.features)
    small = sum(f.stat().st_size for pattern in _SMALL_FILES for f in files[0].parent.glob(pattern))
    return int(trained * copies * 1.05) + small + 2**20
