"""Tiny models of several architecture families plus a hand-written reference of their layout.

The reference table here is deliberately per-architecture: it is the independent answer that
``forge.layers.find_layers`` (which uses no such table) is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers as tf

H = 32  # hidden size: big enough for 4 heads, small enough to train in milliseconds
V = 64  # vocabulary


@dataclass
class Family:
    name: str
    build: object  # () -> model
    stacks: list[str]  # expected block-list paths, input side first
    embeddings: list[str]  # expected module paths whose params are "embeddings"
    head_param: str | None  # a parameter name that belongs to the head (None: tied)
    kind: str  # "causal" | "seq2seq" | "cls"


def _llama():
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=V,
            hidden_size=H,
            intermediate_size=2 * H,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )


def _qwen3():
    return tf.Qwen3ForCausalLM(
        tf.Qwen3Config(
            vocab_size=V,
            hidden_size=H,
            intermediate_size=2 * H,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
        )
    )


def _gpt2():
    cfg = tf.GPT2Config(vocab_size=V, n_embd=H, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg)


def _neox():
    return tf.GPTNeoXForCausalLM(
        tf.GPTNeoXConfig(
            vocab_size=V,
            hidden_size=H,
            intermediate_size=2 * H,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    )


def _opt():
    return tf.OPTForCausalLM(
        tf.OPTConfig(
            vocab_size=V,
            hidden_size=H,
            ffn_dim=2 * H,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=H,
        )
    )


def _falcon():
    return tf.FalconForCausalLM(
        tf.FalconConfig(vocab_size=V, hidden_size=H, num_hidden_layers=4, num_attention_heads=4)
    )


def _phi():
    return tf.PhiForCausalLM(
        tf.PhiConfig(
            vocab_size=V,
            hidden_size=H,
            intermediate_size=2 * H,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    )


def _gemma():
    return tf.GemmaForCausalLM(
        tf.GemmaConfig(
            vocab_size=V,
            hidden_size=H,
            intermediate_size=2 * H,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
        )
    )


def _t5():
    # 3 encoder + 2 decoder blocks: unequal on purpose.
    return tf.T5ForConditionalGeneration(
        tf.T5Config(
            vocab_size=V,
            d_model=H,
            d_kv=8,
            d_ff=2 * H,
            num_layers=3,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
    )


def _bert():
    return tf.BertForSequenceClassification(
        tf.BertConfig(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=2 * H,
            max_position_embeddings=64,
            num_labels=2,
        )
    )


FAMILIES = {
    f.name: f
    for f in [
        Family("llama", _llama, ["model.layers"], ["model.embed_tokens"], "lm_head.weight", "causal"),
        Family("qwen3", _qwen3, ["model.layers"], ["model.embed_tokens"], "lm_head.weight", "causal"),
        Family("gpt2", _gpt2, ["transformer.h"], ["transformer.wte", "transformer.wpe"], None, "causal"),
        Family("gpt_neox", _neox, ["gpt_neox.layers"], ["gpt_neox.embed_in"], "lm_head.weight", "causal"),
        Family(
            "opt",
            _opt,
            ["model.decoder.layers"],
            ["model.decoder.embed_tokens", "model.decoder.embed_positions"],
            None,
            "causal",
        ),
        Family("falcon", _falcon, ["transformer.h"], ["transformer.word_embeddings"], None, "causal"),
        Family("phi", _phi, ["model.layers"], ["model.embed_tokens"], "lm_head.weight", "causal"),
        Family("gemma", _gemma, ["model.layers"], ["model.embed_tokens"], None, "causal"),
        Family("t5", _t5, ["encoder.block", "decoder.block"], ["shared"], None, "seq2seq"),
        Family("bert", _bert, ["bert.encoder.layer"], ["bert.embeddings"], "classifier.weight", "cls"),
    ]
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return FAMILIES[name].build()


def expected_block_params(model, family: Family, prefix: str = "") -> list[list[str]]:
    """Parameter names of each block, from the reference stack paths (input side first)."""
    named = dict(model.named_parameters())
    out = []
    for stack in family.stacks:
        path = f"{prefix}{stack}"
        for i in range(len(model.get_submodule(path))):
            out.append([n for n in named if n.startswith(f"{path}.{i}.")])
    return out


def batches(kind: str, n: int = 16, seq: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A tiny dataset (list of examples) for the Trainer."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, V, (seq,), generator=g)
        if kind == "causal":
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        elif kind == "seq2seq":
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.flip(0)[: seq // 2]})
        else:
            rows.append(
                {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(int(ids[0] % 2))}
            )
    return rows


def training_args(out_dir, **overrides):
    kwargs = {
        "output_dir": str(out_dir),
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-2,
        "weight_decay": 0.1,
        "max_steps": 4,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1000,
        "disable_tqdm": True,
        "seed": 0,
        "lr_scheduler_type": "constant",
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
    }
    kwargs.update(overrides)
    return tf.TrainingArguments(**kwargs)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
