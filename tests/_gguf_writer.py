"""Write a tiny Llama as a GGUF file the way llama.cpp's converter does, for the GGUF tests.

The reference is the HF model itself: transformers reads the file back (undoing llama.cpp's
Q/K row permutation, unpacking quantized blocks), and the tests compare that with the model
that was written, with the quantized weights replaced by the ``gguf`` package's own
``dequantize(quantize(w))``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# Which tensors the tests store quantized (Q8_0): one of each kind of layer is enough.
QUANTIZED = ("blk.0.ffn_up.weight", "blk.1.attn_v.weight")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of Q/K rows (rotary halves interleaved); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """The model's weights under GGUF names, in GGUF row order."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = _permute(w, cfg.num_attention_heads)
            elif gg == "attn_k":
                w = _permute(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{gg}.weight"] = w
    return out


def quantized_reference(model) -> None:
    """Replace, in place, the weights :data:`QUANTIZED` names by what Q8_0 keeps of them."""
    from gguf import GGMLQuantizationType, dequantize, quantize

    hf_names = {"blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
                "blk.1.attn_v.weight": "model.layers.1.self_attn.v_proj.weight"}
    params = dict(model.named_parameters())
    q8 = GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name in QUANTIZED:
            p = params[hf_names[name]]
            kept = dequantize(quantize(p.detach().float().numpy(), q8), q8)
            p.copy_(torch.from_numpy(np.ascontiguousarray(kept)).reshape(p.shape))


def write_gguf(model, tokenizer, path: Path, chat_template: str | None = None) -> Path:
    """Write ``model`` (a small LlamaForCausalLM) and a byte-level BPE ``tokenizer`` to ``path``."""
    from gguf import GGMLQuantizationType, GGUFWriter, TokenType, quantize

    cfg = model.config
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("forge tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = dict(spec["model"]["vocab"])
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in spec["added_tokens"] if a["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)

    q8 = GGMLQuantizationType.Q8_0
    for name, w in gguf_tensors(model).items():
        if name in QUANTIZED:
            writer.add_tensor(name, quantize(w, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
