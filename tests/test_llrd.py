"""forge.layers.llrd: layer-wise learning-rate groups, standalone and inside the Trainer."""

from __future__ import annotations

import pytest
import torch
from _freeze_models import (
    FAMILIES,
    batches,
    build,
    expected_block_params,
    training_args,
)
from torch import nn
from transformers import Trainer

from forge.layers import freeze_layers
from forge.layers.llrd import layerwise_lr_groups, layerwise_lr_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(model, name, base_lr, decay, weight_decay):
    """Expected (lr, weight decay) per parameter name, from the hand-written layout."""
    family = FAMILIES[name]
    blocks = expected_block_params(model, family)
    top = len(blocks) + 1
    depth = {n: i + 1 for i, names in enumerate(blocks) for n in names}
    no_decay = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            # The Trainer's rule: no decay on norms or on any name containing "bias".
            if is_norm or "bias" in full.lower():
                no_decay.add(full)
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        d = 0 if any(n.startswith(e + ".") for e in family.embeddings) else depth.get(n, top)
        out[n] = (base_lr * decay ** (top - d), 0.0 if n in no_decay else weight_decay)
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "bert"])
def test_groups_carry_expected_rates_and_weight_decay(name):
    model = build(name)
    freeze_layers(model, indices=[1])
    groups = layerwise_lr_groups(model, base_lr=1e-3, decay=0.5, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in got  # each parameter exactly once
            got[names[id(p)]] = (g["lr"], g["weight_decay"])
    want = _reference(model, name, 1e-3, 0.5, 0.1)
    assert got.keys() == want.keys()  # frozen block 1 excluded, all trainable included
    for n in want:
        assert got[n] == pytest.approx(want[n]), n
    assert groups[0]["lr"] == pytest.approx(1e-3)  # the rate the Trainer logs is the base rate


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
    want = _reference(model, "llama", 1e-2, 0.5, args.weight_decay)
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
            assert g["lr"] == pytest.approx(0.5 ** (4 - block))
