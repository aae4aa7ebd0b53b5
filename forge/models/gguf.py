"""GGUF checkpoints (llama.cpp's one-file format) as plain float transformers models.

transformers reads a ``.gguf`` file (``from_pretrained(directory, gguf_file=name)``) and
unpacks its quantized blocks to floats, but the model it returns still carries a GGUF
"quantizer" that the Trainer refuses to train and ``save_pretrained`` refuses to save. forge
copies the dequantized weights into a fresh model of the same class, with
``quantization_config`` dropped: an ordinary model that trains, saves and reloads like any
other.

Example:
    >>> model = load_gguf_model("/models/smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> model.save_pretrained("/models/smollm2-float")      # config.json + model.safetensors
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from forge.errors import ForgeError

GGUF_SUFFIX = ".gguf"
INSTALL_HINT = "pip install 'transformers-forge[gguf]'"


def split_gguf_path(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(directory, file name)`` of a GGUF checkpoint; ``(name_or_path, None)`` for any other.

    A path that itself ends in ``.gguf`` names both (and wins over ``gguf_file``, so an adapter
    that records its GGUF base by file path finds it again).

    Example:
        >>> split_gguf_path("/models/smol/model.Q4_1.gguf")
        ('/models/smol', 'model.Q4_1.gguf')
        >>> split_gguf_path("/models/smol", "model.Q4_1.gguf")
        ('/models/smol', 'model.Q4_1.gguf')
    """
    if name_or_path.lower().endswith(GGUF_SUFFIX):
        path = Path(name_or_path).expanduser()
        return str(path.parent), path.name
    return name_or_path, gguf_file


def require_gguf() -> None:
    """Raise a :class:`ForgeError` saying what to install when the ``gguf`` package is missing.

    Example:
        >>> require_gguf()      # silent when `gguf` is installed
    """
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ForgeError(f"loading a .gguf checkpoint needs the gguf package: {INSTALL_HINT}") from None


def check_gguf_file(directory: str, gguf_file: str) -> None:
    """Fail early, in one line, when a local GGUF file is missing or gguf is not installed.

    A ``directory`` that is not on this machine is left to transformers (a Hub repository).
    """
    require_gguf()
    local = Path(directory).expanduser()
    if local.is_dir() and not (local / gguf_file).is_file():
        present = sorted(p.name for p in local.glob(f"*{GGUF_SUFFIX}"))
        found = f" (it has {', '.join(present)})" if present else " (it has no .gguf file)"
        raise ForgeError(f"model.gguf_file '{gguf_file}' not found in '{directory}'{found}")
    if not local.exists() and directory.startswith((".", "/", "~")):
        raise ForgeError(f"model path '{directory}' does not exist")


def load_gguf_model(
    directory: str,
    gguf_file: str,
    dtype: Any = "auto",
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> Any:
    """Load a GGUF checkpoint dequantized, as a plain trainable ``PreTrainedModel``.

    Args:
        directory: the local folder (or Hub repository) holding the file.
        gguf_file: the file's name inside ``directory``.
        dtype: a ``torch.dtype`` or ``"auto"`` (what the file's float tensors are; float32 for
            most quantized files).
        attn_implementation: ``sdpa``, ``eager``, ... or None for the transformers default.
        **kwargs: more ``from_pretrained`` keyword arguments (``revision``, ...).

    Returns:
        A model of the checkpoint's own class (e.g. ``LlamaForCausalLM``) with no
        ``quantization_config``; its ``name_or_path`` is the file's path, so a PEFT adapter
        trained on it records where its base is.

    Raises:
        ForgeError: gguf is not installed, or the file cannot be read.

    Example:
        >>> model = load_gguf_model("/models/smol", "model.Q4_1.gguf", dtype=torch.float32)
    """
    from transformers import AutoModelForCausalLM

    check_gguf_file(directory, gguf_file)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    kwargs.update(_dequantize_option())
    try:
        packed = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ForgeError(f"cannot load the GGUF checkpoint '{Path(directory, gguf_file)}': {first}") from None
    model = plain_copy(packed)
    # PEFT records the base of an adapter from the model's `name_or_path` (an attribute
    # copied from the config at init): the file's path, so the adapter can find it again.
    model.name_or_path = model.config.name_or_path = str(Path(directory, gguf_file))
    return model


def _dequantize_option() -> dict[str, Any]:
    """Ask transformers to unpack every block, even where it could keep them packed (its GGUF
    kernels): packed GGUF weights cannot train. Older transformers always unpack."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def plain_copy(model: Any) -> Any:
    """The same weights in a fresh model of the same class, with no quantization attached.

    Example:
        >>> plain = plain_copy(packed)            # packed.config.quantization_config is gone
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(model)(config)
    fresh.to(dtype=model.dtype)
    # strict: every weight of the class must come from the file (tied heads share one tensor).
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = copy.deepcopy(model.generation_config)
    fresh.eval()
    return fresh


def load_gguf_tokenizer(directory: str, gguf_file: str, **kwargs: Any) -> Any:
    """The tokenizer a GGUF file describes (vocabulary, merges, special tokens, chat template).

    Example:
        >>> tok = load_gguf_tokenizer("/models/smol", "model.Q4_1.gguf")
    """
    from transformers import AutoTokenizer

    check_gguf_file(directory, gguf_file)
    try:
        return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ForgeError(f"cannot load the tokenizer of '{Path(directory, gguf_file)}': {first}") from None
