"""forge.layers.config: the ``freeze:`` preset section and its Trainer wiring."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _freeze_models import (
    FAMILIES,
    batches,
    build,
    expected_block_params,
    snapshot,
    training_args,
)
from transformers import Trainer

from forge.layers.config import FreezeConfig, from_preset
from forge.layers.llrd import LayerwiseLRDecayFactory
from forge.layers.schedules import (
    GradualUnfreezingCallback,
    LISACallback,
    LPLoRACallback,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_field_has_help_and_defaults_validate():
    for f in dataclasses.fields(FreezeConfig):
        assert f.metadata.get("help"), f.name
    FreezeConfig().validate()


def test_all_errors_reported_at_once():
    with pytest.raises(ValueError) as err:
        FreezeConfig(ratio=2.0, first=-1, schedule="lisa", lisa_active_layers=0, layerwise_lr_decay=0.0)
    message = str(err.value)
    for part in ("ratio", "first", "every_n_steps", "lisa_active_layers", "layerwise_lr_decay"):
        assert part in message


def test_disabled_changes_nothing(tmp_path):
    model = build("llama")
    extra = from_preset(FreezeConfig(enabled=False, ratio=1.0), model, training_args(tmp_path))
    assert extra == {}
    assert all(p.requires_grad for p in model.parameters())


def test_static_freezing_applied_in_place(tmp_path):
    model = build("llama")
    blocks = expected_block_params(model, FAMILIES["llama"])
    extra = from_preset(FreezeConfig(enabled=True, ratio=0.5, embeddings=True), model, training_args(tmp_path))
    assert extra == {}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(blocks[0]) | set(blocks[1]) | {"model.embed_tokens.weight"}


@pytest.mark.parametrize(
    ("schedule", "cls", "period"),
    [
        ("gradual", GradualUnfreezingCallback, {"every_n_epochs": 1}),
        ("lisa", LISACallback, {"every_n_steps": 2}),
        ("lp_lora", LPLoRACallback, {"every_n_steps": 3}),
    ],
)
def test_schedule_becomes_callback(schedule, cls, period, tmp_path):
    model = build("llama")
    args = training_args(tmp_path, seed=11)
    extra = from_preset(FreezeConfig(enabled=True, schedule=schedule, **period), model, args)
    (cb,) = extra["callbacks"]
    assert isinstance(cb, cls)
    if schedule == "lisa":
        assert cb.seed == 11  # falls back to TrainingArguments.seed


def test_end_to_end_static_lisa_and_llrd_in_trainer(tmp_path):
    model = build("llama")
    blocks = expected_block_params(model, FAMILIES["llama"])
    args = training_args(tmp_path, max_steps=4)
    cfg = FreezeConfig(
        enabled=True, indices=[0], schedule="lisa", every_n_steps=2, lisa_active_layers=1, layerwise_lr_decay=0.5
    )
    extra = from_preset(cfg, model, args)
    assert extra["optimizer_cls_and_kwargs"][0] is LayerwiseLRDecayFactory
    before = snapshot(model)
    trainer = Trainer(model=model, args=args, train_dataset=batches("causal", n=32), **extra)
    trainer.train()
    # Block 0 was frozen statically, so LISA never picks it and it never moves.
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in blocks[0])
    lrs = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}
    assert lrs["head"] == pytest.approx(args.learning_rate)
    assert lrs["block.3"] == pytest.approx(args.learning_rate * 0.5)
    assert "block.0" not in lrs
