"""forge.core.trainable: one view of what trains, its groups from find_layers (the one grouper),
kept current as schedules change trainability."""

from __future__ import annotations

import torch
from conftest import make_tiny_llama

from forge.core.trainable import group_label, trainable_set


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_decoder_layers=3, num_heads=4))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=12, n_head=4, n_positions=32))


def test_groups_follow_the_model_structure_on_several_architectures():
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(make_tiny_llama(num_hidden_layers=4), LoraConfig(r=2, target_modules=["q_proj"]))
    ts = trainable_set(peft)
    name = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight"
    assert ts.group_of(name) == "layer_03"
    assert ts.group_of("base_model.model.model.embed_tokens.weight") == "embeddings"
    assert ts.group_of("base_model.model.model.norm.weight") == "norm"
    assert ts.group_of("base_model.model.lm_head.weight") == "head"
    assert all("lora_" in n for n in ts.universe)  # PEFT's frozen base is not in the universe

    t5 = trainable_set(_t5())
    assert t5.group_of("encoder.block.0.layer.0.SelfAttention.q.weight") == "encoder_layer_00"
    assert t5.group_of("decoder.block.2.layer.0.SelfAttention.q.weight") == "decoder_layer_02"
    assert t5.group_of("shared.weight") == "embeddings"

    gpt2 = trainable_set(_gpt2())
    assert gpt2.group_of("transformer.h.11.attn.c_attn.weight") == "layer_11"
    assert gpt2.group_of("transformer.h.2.mlp.c_fc.weight") == "layer_02"  # zero-padded: sorts
    assert gpt2.group_of("transformer.ln_f.weight") == "norm"


def test_group_labels():
    assert group_label("block.7") == "layer_07"
    assert group_label("block.3", (0, 0, 1, 1), ("encoder.block", "decoder.block")) == "decoder_layer_01"
    assert group_label("head") == "head"


def test_one_set_per_model_through_wrappers():
    model = make_tiny_llama()
    assert trainable_set(model) is trainable_set(torch.compile(model))


def test_refresh_records_changes_and_declared_parameters_stay_in_the_universe():
    model = make_tiny_llama(num_hidden_layers=2)
    ts = trainable_set(model)
    block0 = [n for n in ts.universe if ".layers.0." in n]
    ts.declare(block0)
    heard = []
    ts.subscribe(lambda s, step: heard.append(step))
    for n, p in model.named_parameters():
        if n in block0:
            p.requires_grad_(False)
    assert ts.refresh(step=5, reason="test") is True
    assert ts.refresh(step=6) is False  # nothing changed
    assert ts.version == 1 and heard == [5]
    assert set(block0) <= set(ts.universe)  # frozen now, but it will train: EMA keeps it
    assert not set(block0) & set(ts.active_names())
    event = ts.events[-1]
    assert event["step"] == 5 and event["blocks"] == [1]
    assert event["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_skipped_steps_are_shared():
    from forge.core.trainable import skip_flag

    model = make_tiny_llama()
    trainable_set(model).skip(3)
    assert skip_flag(model, 3) and not skip_flag(model, 4)
    assert not skip_flag(torch.nn.Linear(2, 2), 3)  # a model nobody marked
