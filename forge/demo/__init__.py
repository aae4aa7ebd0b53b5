"""forge's bundled demo: a tiny Llama built locally, its tokenizer file, and demo data.

Nothing here touches the network. ``builtin:tiny-llama`` is materialised once into
``$FORGE_HOME/builtin/`` (default ``~/.cache/forge``) as an ordinary HF model directory,
so every loading path (dtype, quantization, PEFT) treats it like any other checkpoint.

Example:
    >>> from forge.demo import builtin_model_dir
    >>> model = AutoModelForCausalLM.from_pretrained(builtin_model_dir())
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
BUILTIN_PREFIX = "builtin:"
BUILTIN_DATA = {"demo-sft": HERE / "demo_sft.jsonl", "demo-dpo": HERE / "demo_dpo.jsonl",
                "demo-text": HERE / "demo_text.jsonl"}
BUILTIN_MODELS = ("tiny-llama",)
# Bump when the architecture or init changes, so stale cached copies are not reused.
_MODEL_VERSION = "v1"

# ChatML with `{% generation %}` markers, so TRL's assistant_only_loss works with it.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>' + '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def forge_home() -> Path:
    """Where forge caches what it builds: ``$FORGE_HOME`` or ``~/.cache/forge``."""
    return Path(os.environ.get("FORGE_HOME", Path.home() / ".cache" / "forge"))


def builtin_tokenizer():
    """The bundled byte-level BPE as a ``PreTrainedTokenizerFast`` with a chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(HERE / "tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_llama(vocab_size: int, seed: int = 0):
    """A ~0.8M-parameter random-initialised LlamaForCausalLM (4 layers, hidden 128)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=2,  # <|im_end|>
        pad_token_id=3,  # <|pad|>
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def builtin_model_dir(name: str = "tiny-llama") -> Path:
    """A local HF model directory (config, safetensors, tokenizer) for a builtin model.

    Built on first use and written atomically, so two processes starting together (e.g.
    under torchrun) never read a half-written directory.
    """
    if name not in BUILTIN_MODELS:
        from forge.errors import ForgeError

        raise ForgeError(f"unknown builtin model 'builtin:{name}'; available: "
                         + ", ".join(f"builtin:{m}" for m in BUILTIN_MODELS))
    target = forge_home() / "builtin" / f"{name}-{_MODEL_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tok = builtin_tokenizer()
    # Round the embedding up to a multiple of 64, as real models do for fast matmuls.
    model = build_tiny_llama(vocab_size=-(-len(tok) // 64) * 64)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def builtin_data_path(name: str) -> Path:
    """The bundled data file for ``builtin:demo-sft`` or ``builtin:demo-dpo``."""
    if name not in BUILTIN_DATA:
        from forge.errors import ForgeError

        raise ForgeError(f"unknown builtin data set 'builtin:{name}'; available: "
                         + ", ".join(f"builtin:{d}" for d in BUILTIN_DATA))
    return BUILTIN_DATA[name]
