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

from forge.config.schema import ModelConfig
from forge.demo import BUILTIN_PREFIX, CHAT_TEMPLATE
from forge.errors import ForgeError
from forge.models import check_gguf_file, load_gguf_model, model_dir, split_gguf_path

logger = logging.getLogger(__name__)

# Used where a tokenizer ships no chat template (base models): ChatML, which most open
# chat models use, with `{% generation %}` markers so assistant-only loss works.
FALLBACK_CHAT_TEMPLATE = CHAT_TEMPLATE


def resolve_model_path(name_or_path: str) -> str:
    """``builtin:tiny-llama`` (or a fetched ``builtin:smollm2-135m``) -> its local directory;
    anything else is returned unchanged."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        return str(model_dir(name_or_path[len(BUILTIN_PREFIX):]))
    return name_or_path


def gguf_location(model: ModelConfig, name_or_path: str | None = None) -> tuple[str, str | None]:
    """``(directory, GGUF file name or None)`` of the checkpoint a ``model:`` section names,
    checked (gguf installed, the file there, no bitsandbytes quantization on top) when a GGUF."""
    directory, gguf_file = split_gguf_path(resolve_model_path(name_or_path or model.name_or_path),
                                           model.gguf_file if name_or_path is None else None)
    if gguf_file is not None:
        if model.quantization:
            raise ForgeError("model.quantization cannot be combined with a GGUF checkpoint "
                             "(model.gguf_file): it is loaded dequantized, to float")
        check_gguf_file(directory, gguf_file)
    return directory, gguf_file


def _load_error(what: str, name: str, err: Exception) -> ForgeError:
    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if looks_local and not Path(name).expanduser().exists():
        return ForgeError(f"{what} path '{name}' does not exist")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ForgeError(f"cannot load {what} '{name}': {first}")


def _weights_error(name: str, err: BaseException) -> ForgeError | None:
    """What went wrong reading a model's files, in one line (None: not a file problem)."""
    import pickle

    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, pickle.UnpicklingError):
        return ForgeError(f"cannot load model '{name}': torch refused to unpickle a weights file "
                          "(it holds more than tensors, so weights_only=True stopped it); use a "
                          "model saved as .safetensors, or convert one you trust")
    if type(err).__name__ == "SafetensorError":
        return ForgeError(f"cannot load model '{name}': a .safetensors file is corrupt or cut "
                          f"short ({first})")
    if isinstance(err, RuntimeError) and ("ignore_mismatched_sizes" in first or "size mismatch" in first):
        return ForgeError(f"cannot load model '{name}': its config.json does not match its weights "
                          "(tensor shapes differ; the load report above lists them)")
    if isinstance(err, (OSError, ValueError)):
        return _load_error("model", name, err)
    return None


def _missing_weights(name: str, info: dict[str, Any]) -> None:
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ForgeError(f"cannot load model '{name}': its config.json does not match its weights: "
                         f"{len(missing)} weights the config asks for are not in the files ({shown})")


def load_tokenizer(model: ModelConfig) -> Any:
    """The model's tokenizer, with a pad token and a chat template guaranteed.

    A tokenizer without a pad token pads with its EOS token (the usual choice for causal
    LMs); one without a chat template gets :data:`FALLBACK_CHAT_TEMPLATE`, with a note.
    """
    from transformers import AutoTokenizer

    name = model.tokenizer or model.name_or_path
    # A GGUF file carries its tokenizer; a separate `tokenizer:` is an ordinary one.
    path, gguf_file = gguf_location(model) if not model.tokenizer else (resolve_model_path(name), None)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(
            path, revision=model.revision, trust_remote_code=model.trust_remote_code, **extra
        )
    except (OSError, ValueError) as err:
        raise _load_error("tokenizer" if model.tokenizer else "model", name, err) from None
    except Exception as err:  # KeyError, the tokenizers library's own errors: a broken tokenizer.json
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ForgeError(f"cannot load the tokenizer of '{name}': its files are broken "
                         f"({type(err).__name__}: {first})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        logger.warning("tokenizer of '%s' has no chat template; using forge's ChatML fallback", name)
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    return tok


def model_max_positions(model: ModelConfig) -> int | None:
    """``max_position_embeddings`` of the model's (text) config, read without the weights;
    None when the config does not say or cannot be read here."""
    from transformers import AutoConfig

    base = adapter_base(model.name_or_path)
    try:
        path, gguf_file = gguf_location(model, base)
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        config = AutoConfig.from_pretrained(path, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code, **extra)
    except (OSError, ValueError, ForgeError):
        return None  # load_model reports the real problem
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


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
        A ``PreTrainedModel``, or a ``PeftModel`` when ``peft_config`` is given. A saved
        adapter directory as ``model.name_or_path`` (e.g. ``forge train dpo --model
        outputs/my-lora-run``) continues that adapter (see :func:`_load_from_adapter`).

    Raises:
        ForgeError: the model path does not exist, cannot be loaded, or bitsandbytes is
            missing for a quantized load.
    """
    adapter = adapter_base(model.name_or_path)
    if adapter is not None:
        return _load_from_adapter(model, adapter, quantization_config, peft_config)
    lm = _load_base(model, None, quantization_config)
    if peft_config is None:
        return lm
    from peft import get_peft_model

    return get_peft_model(_prepare_kbit(lm, quantization_config), peft_config)


def _load_base(model: ModelConfig, name: str | None, quantization_config: Any) -> Any:
    """The base model: ``model.name_or_path`` (``name`` None) or an adapter's base ``name``."""
    from transformers import AutoModelForCausalLM

    path, gguf_file = gguf_location(model, name)
    if gguf_file is not None:
        return load_gguf_model(path, gguf_file, dtype=_torch_dtype(model.dtype),
                               attn_implementation=model.attn_implementation, revision=model.revision)
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
    shown = model.name_or_path if path == resolve_model_path(model.name_or_path) else path
    try:
        lm, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as err:
        mapped = _weights_error(shown, err)
        if mapped is None:
            raise
        raise mapped from None
    _missing_weights(shown, info)
    return lm


def _prepare_kbit(lm: Any, quantization_config: Any) -> Any:
    if quantization_config is None:
        return lm
    from peft import prepare_model_for_kbit_training

    # Casts norms to fp32 and enables input grads, so adapters train stably on a 4-bit base.
    return prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)


ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(name_or_path: str) -> str | None:
    """The base model of a saved PEFT adapter directory (e.g. a ``forge train lora`` output),
    or None when ``name_or_path`` is not one."""
    import json

    config = Path(name_or_path).expanduser() / ADAPTER_CONFIG
    if not config.is_file():
        return None
    try:
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise ForgeError(f"{config}: cannot read the adapter config ({err})") from None
    if not base:
        raise ForgeError(f"{config}: no base_model_name_or_path; cannot tell which model it adapts")
    return str(base)


def _load_from_adapter(model: ModelConfig, base: str, quantization_config: Any, peft_config: Any) -> Any:
    """Continue from a trained adapter instead of stacking a new one on the raw base.

    With a ``peft:`` section the saved adapter itself is what trains (so its saved result,
    loaded on the base, is the model of both stages); TRL's DPOTrainer then makes a frozen
    copy of it the reference, as DPO wants (the SFT model, not the raw base). Without one
    (a full fine-tune) the adapter is merged into the base first.
    """
    from peft import PeftModel

    lm = _load_base(model, base, quantization_config)
    try:
        if peft_config is None:
            logger.info("model %s is an adapter of %s: merged into it for a full fine-tune", model.name_or_path, base)
            return PeftModel.from_pretrained(lm, model.name_or_path).merge_and_unload()
        lm = _prepare_kbit(lm, quantization_config)
        return PeftModel.from_pretrained(lm, str(Path(model.name_or_path).expanduser()), is_trainable=True)
    except Exception as err:
        mapped = _weights_error(model.name_or_path, err)
        if mapped is None:
            raise
        raise mapped from None
