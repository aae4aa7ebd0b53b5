"""Load the tokenizer and model a preset names: dtype, quantization, PEFT, chat template.

Example:
    >>> preset = forge.load_preset("qlora", {"model.name_or_path": "/models/qwen3-8b"})
    >>> tokenizer = load_tokenizer(preset.model)
    >>> model = load_model(preset.model, preset.quantization_config(), preset.peft_config())
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from forge.config import ModelConfig
from forge.demo import BUILTIN_PREFIX, CHAT_TEMPLATE, builtin_model_dir
from forge.errors import ForgeError

logger = logging.getLogger(__name__)

# Used where a tokenizer ships no chat template (base models): ChatML, which most open
# chat models use, with `{% generation %}` markers so assistant-only loss works.
FALLBACK_CHAT_TEMPLATE = CHAT_TEMPLATE


def resolve_model_path(name_or_path: str) -> str:
    """``builtin:tiny-llama`` -> its local directory; anything else is returned unchanged."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        return str(builtin_model_dir(name_or_path[len(BUILTIN_PREFIX):]))
    return name_or_path


def _load_error(what: str, name: str, err: Exception) -> ForgeError:
    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if looks_local and not Path(name).expanduser().exists():
        return ForgeError(f"{what} path '{name}' does not exist")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ForgeError(f"cannot load {what} '{name}': {first}")


def load_tokenizer(model: ModelConfig) -> Any:
    """The model's tokenizer, with a pad token and a chat template guaranteed.

    A tokenizer without a pad token pads with its EOS token (the usual choice for causal
    LMs); one without a chat template gets :data:`FALLBACK_CHAT_TEMPLATE`, with a note.
    """
    from transformers import AutoTokenizer

    name = model.tokenizer or model.name_or_path
    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(
            path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise _load_error("tokenizer" if model.tokenizer else "model", name, err) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        logger.warning("tokenizer of '%s' has no chat template; using forge's ChatML fallback", name)
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    return tok


def _torch_dtype(name: str) -> Any:
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def load_model(
    model: ModelConfig,
    quantization_config: Any = None,
    peft_config: Any = None,
) -> Any:
    """Load a causal LM, quantize it if asked, and wrap it with PEFT adapters if asked.

    Args:
        model: the preset's ``model:`` section.
        quantization_config: a ``BitsAndBytesConfig`` or None.
        peft_config: a ``LoraConfig`` or None (full fine-tune).

    Returns:
        A ``PreTrainedModel``, or a ``PeftModel`` when ``peft_config`` is given.

    Raises:
        ForgeError: the model path does not exist, cannot be loaded, or bitsandbytes is
            missing for a quantized load.
    """
    from transformers import AutoModelForCausalLM

    if quantization_config is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ForgeError("model.quantization needs bitsandbytes: pip install bitsandbytes") from None
    kwargs: dict[str, Any] = {
        "dtype": _torch_dtype(model.dtype),
        "revision": model.revision,
        "trust_remote_code": model.trust_remote_code,
    }
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        lm = AutoModelForCausalLM.from_pretrained(resolve_model_path(model.name_or_path), **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error("model", model.name_or_path, err) from None
    if peft_config is None:
        return lm
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantization_config is not None:
        # Casts norms to fp32 and enables input grads, so adapters train stably on a 4-bit base.
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    return get_peft_model(lm, peft_config)
