"""forge.layers.llrd: layer-wise learning-rate groups, standalone and inside the Trainer."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from _freeze_models import (
    FAMILIES,
    batches,
    build,
    expected_block_params,
    training_args,
)
from conftest import make_tiny_llama
from torch import nn
from transformers import Trainer

from forge.layers import freeze_layers
from forge.layers.llrd import layer_depths, layerwise_lr_groups, layerwise_lr_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _no_decay(model):
    """The Trainer's rule, written out: no weight decay on norms or on any name containing "bias"."""
    out = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if is_norm or "bias" in full.lower():
                out.add(full)
    return out


def _tiny(name):
    torch.manual_seed(0)
    if name in ("llama", "llama_tied"):
        return make_tiny_llama(num_hidden_layers=2, tie_word_embeddings=name == "llama_tied")
    if name == "t5":  # 2 encoder blocks, 1 decoder block; `shared` is tied to the LM head
        return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                         num_decoder_layers=1, num_heads=4))
    if name == "bart":
        return tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                bos_token_id=0, eos_token_id=0))
    return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64))


# What users expect, by hand: the exponent d of base_lr * decay ** d for each module, counted from
# the top. The head trains at the base rate whether it is tied or not; encoder and decoder are
# each decayed from their own top; embeddings sit one below their stack's bottom block.
TABLES = {
    "llama": {"lm_head.": 0, "model.norm.": 0, "model.layers.1.": 1, "model.layers.0.": 2, "model.embed_tokens.": 3},
    "llama_tied": {"model.embed_tokens.": 0, "model.norm.": 0, "model.layers.1.": 1, "model.layers.0.": 2},
    "t5": {"shared.": 0, "encoder.final_layer_norm.": 0, "decoder.final_layer_norm.": 0,
           "encoder.block.1.": 1, "encoder.block.0.": 2, "decoder.block.0.": 1},
    "bart": {"model.shared.": 0, "model.encoder.layer_norm.": 0, "model.decoder.layer_norm.": 0,
             "model.encoder.layers.1.": 1, "model.encoder.layers.0.": 2, "model.encoder.embed_positions.": 3,
             "model.encoder.layernorm_embedding.": 3, "model.decoder.layers.0.": 1,
             "model.decoder.embed_positions.": 2, "model.decoder.layernorm_embedding.": 2, "final_logits_bias": 0},
    "gpt2": {"transformer.wte.": 0, "transformer.ln_f.": 0, "transformer.h.1.": 1, "transformer.h.0.": 2,
             "transformer.wpe.": 3},
    "bert": {"classifier.": 0, "bert.pooler.": 0, "bert.encoder.layer.1.": 1, "bert.encoder.layer.0.": 2,
             "bert.embeddings.": 3},
}


@pytest.mark.parametrize("name", list(TABLES))
def test_groups_match_the_hand_built_table(name):
    model = _tiny(name)
    groups = layerwise_lr_groups(model, base_lr=1.0, decay=0.5, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in got  # each parameter exactly once
            got[names[id(p)]] = (g["lr"], g["weight_decay"])
    no_decay = _no_decay(model)
    table = TABLES[name]
    assert got.keys() == set(names.values())
    for n, value in got.items():
        (prefix,) = [k for k in table if n.startswith(k)]  # every parameter is in the table, once
        assert value == (0.5 ** table[prefix], 0.0 if n in no_decay else 0.1), n
    assert groups[0]["lr"] == 1.0 and groups[0]["name"] in ("head", "other")  # what the Trainer logs
    head = model.get_output_embeddings()  # tied or not, the LM head weight is in the "head" group
    assert head is None or any(head.weight is p and g["name"] == "head" for g in groups for p in g["params"])


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "bert"])
def test_frozen_parameters_are_left_out(name):
    model = build(name)
    freeze_layers(model, indices=[1])
    groups = layerwise_lr_groups(model, base_lr=1e-3, decay=0.5, weight_decay=0.1)
    listed = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert listed == trainable and len(trainable) < len(list(model.parameters()))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(expected_block_params(model, FAMILIES[name])[1])


def test_invalid_decay_raises():
    with pytest.raises(ValueError):
        layerwise_lr_groups(build("llama"), 1e-3, decay=1.5)


def test_trainer_factory_keeps_ratios_through_the_scheduler(tmp_path):
    model = build("llama")
    args = training_args(
        tmp_path,
        max_steps=3,
        warmup_steps=1,
        learning_rate=1e-2,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=batches("causal"),
        optimizer_cls_and_kwargs=layerwise_lr_optimizer(args, decay=0.5),
    )
    trainer.train()
    opt = trainer.optimizer
    want = {n: (1e-2 * 0.5**d, 0.0 if n in _no_decay(model) else args.weight_decay)
            for n, d in layer_depths(model).items()}
    assert len(set(layer_depths(model).values())) == 6  # 4 blocks, the head and the embeddings
    names = {id(p): n for n, p in model.named_parameters()}
    head_lr = next(g["lr"] for g in opt.param_groups if g["name"] == "head")
    assert head_lr == pytest.approx(1e-3)  # the schedule moved it (to its minimum)
    for g in opt.param_groups:
        for p in g["params"]:
            lr, wd = want[names[id(p)]]
            assert g["initial_lr"] == pytest.approx(lr)
            assert g["lr"] / head_lr == pytest.approx(lr / 1e-2)
            assert g["weight_decay"] == pytest.approx(wd)
    assert opt.defaults.get("fused") == (args.optim == "adamw_torch_fused")


def test_trainer_params_route_also_works(tmp_path):
    model = build("bert")
    groups = layerwise_lr_groups(model, base_lr=1e-3, decay=0.8)
    args = training_args(tmp_path, max_steps=1)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=batches("cls"),
        optimizer_cls_and_kwargs=(torch.optim.AdamW, {"params": groups, "lr": 1e-3}),
    )
    trainer.train()
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == [g["lr"] for g in groups]


def test_peft_groups_hold_only_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    groups = layerwise_lr_groups(model, base_lr=1.0, decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            assert "lora_" in n
            block = int(n.split(".layers.")[1].split(".")[0])
            assert g["lr"] == pytest.approx(0.5 ** (4 - block))  # 4 blocks: the top one at 0.5
