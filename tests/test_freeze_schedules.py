"""forge.layers.schedules: gradual unfreezing, LP-LoRA and LISA inside a real Trainer."""

from __future__ import annotations

import json
import os

import numpy as np
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
from transformers import Trainer, TrainerCallback

from forge.layers.schedules import (
    GradualUnfreezingCallback,
    LISACallback,
    LPLoRACallback,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(TrainerCallback):
    """Per step: which parameters were trainable and which actually changed in that step."""

    def __init__(self):
        self.trainable: dict[int, set[str]] = {}
        self.changed: dict[int, set[str]] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._step = state.global_step
        self._before = snapshot(model)
        self.trainable[self._step] = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.changed[self._step] = {n for n, p in model.named_parameters() if not torch.equal(p, self._before[n])}


def _blocks(model):
    return expected_block_params(model, FAMILIES["llama"])


def _train(model, tmp_path, callbacks, n_rows=64, resume=None, **overrides):
    rec = Recorder()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, **overrides),
        train_dataset=batches("causal", n=n_rows),
        callbacks=[*callbacks, rec],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rec


def _check_only_trainable_moved(rec):
    for step, changed in rec.changed.items():
        assert changed <= rec.trainable[step], (step, changed - rec.trainable[step])
        assert changed, step  # something did train


def test_gradual_unfreezing_flips_top_down_at_expected_steps(tmp_path):
    model = build("llama")
    blocks = _blocks(model)
    cb = GradualUnfreezingCallback(model, every_n_steps=2)
    trainer, rec = _train(model, tmp_path, [cb], max_steps=12, weight_decay=0.5)
    top = {"model.norm.weight", "lm_head.weight"}
    for step in range(12):
        stage = step // 2
        want = set(top)
        for i in range(max(4 - stage, 0), 4):
            want |= set(blocks[i])
        if stage >= 5:
            want.add("model.embed_tokens.weight")
        assert rec.trainable[step] == want, step
    _check_only_trainable_moved(rec)
    # Every scheduled parameter sits in the optimizer from the start, and weight decay (0.5) did
    # not touch the ones that were frozen (checked above); they got state only once trainable.
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.parameters())
    assert cb.num_stages == 6


def test_gradual_unfreezing_by_epochs(tmp_path):
    model = build("llama")
    blocks = _blocks(model)
    cb = GradualUnfreezingCallback(model, every_n_epochs=1, blocks_per_stage=2)
    # 8 rows / batch 4 = 2 steps per epoch.
    _, rec = _train(model, tmp_path, [cb], n_rows=8, max_steps=-1, num_train_epochs=3)
    assert sorted(rec.trainable) == list(range(6))
    for step in range(6):
        epoch = step // 2
        want = {"model.norm.weight", "lm_head.weight"}
        for i in range(max(4 - 2 * epoch, 0), 4):
            want |= set(blocks[i])
        if epoch >= 3:
            want.add("model.embed_tokens.weight")
        assert rec.trainable[step] == want, step


def _lora_cls():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_labels=2,
            pad_token_id=0,
        )
    )
    return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"]))


def test_lp_lora_trains_head_first_then_adapters(tmp_path):
    model = _lora_cls()
    cb = LPLoRACallback(model, probe_steps=3)
    rec = Recorder()
    args = training_args(tmp_path, max_steps=6)
    Trainer(model=model, args=args, train_dataset=batches("cls", n=32), callbacks=[cb, rec]).train()
    names = [n for n, _ in model.named_parameters()]
    head = {n for n in names if "score.modules_to_save" in n}
    lora = {n for n in names if "lora_" in n}
    for step in range(3):
        assert rec.trainable[step] == head
        assert rec.changed[step] == head
    for step in range(3, 6):
        assert rec.trainable[step] == head | lora
        assert rec.changed[step] & lora  # lora_B moves as soon as it trains
    assert not any(p.requires_grad for n, p in model.named_parameters() if "original_module" in n)


def test_lp_lora_refuses_heads_it_cannot_probe():
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match="tied"):
        LPLoRACallback(build("gpt2"), probe_steps=1)
    peft_lm = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        LPLoRACallback(peft_lm, probe_steps=1)


def test_lisa_draws_are_deterministic_under_seed_and_ignore_global_rng():
    model = build("llama")
    a = LISACallback(model, active_layers=2, every_n_steps=5, seed=7)
    torch.manual_seed(123)
    np.random.seed(123)
    b = LISACallback(build("llama"), active_layers=2, every_n_steps=5, seed=7)
    c = LISACallback(build("llama"), active_layers=2, every_n_steps=5, seed=8)
    draws_a = [a.draw(k) for k in range(30)]
    assert draws_a == [b.draw(k) for k in range(30)]
    assert draws_a != [c.draw(k) for k in range(30)]
    assert all(len(d) == 2 and len(set(d)) == 2 and all(0 <= i < 4 for i in d) for d in draws_a)
    assert len({tuple(d) for d in draws_a}) > 1  # it does resample
    # Independent reference: the documented generator.
    assert draws_a[3] == sorted(np.random.default_rng([7, 3]).choice(4, 2, replace=False).tolist())


@pytest.mark.parametrize("reset", [True, False])
def test_lisa_in_trainer_follows_draws_and_handles_optimizer_state(reset, tmp_path):
    model = build("llama")
    blocks = _blocks(model)
    cb = LISACallback(model, active_layers=1, every_n_steps=2, seed=1, reset_optimizer_state=reset)
    trainer, rec = _train(model, tmp_path, [cb], max_steps=10)
    always = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for step in range(10):
        (active,) = cb.draw(step // 2)
        assert rec.trainable[step] == always | set(blocks[active]), step
    # Inactive blocks never move, even with stale Adam moments kept (reset=False): grad is None.
    _check_only_trainable_moved(rec)
    (last,) = cb.draw(4)
    ever = {i for k in range(5) for i in cb.draw(k)}
    state = trainer.optimizer.state
    named = dict(model.named_parameters())
    for i, names in enumerate(blocks):
        for n in names:
            if reset and i == last:
                assert int(state[named[n]]["step"]) <= 2  # restarted when it came back
            elif reset or i not in ever:
                assert named[n] not in state  # deactivated blocks hold no optimizer state
            else:
                assert named[n] in state  # kept, stale, but unused while frozen
    assert int(state[named["lm_head.weight"]]["step"]) == 10


@pytest.mark.parametrize("kind", ["gradual", "lisa", "lp_lora"])
def test_schedule_resume_equals_uninterrupted_run(kind, tmp_path):
    def make():
        if kind == "gradual":
            model = build("llama")
            return model, GradualUnfreezingCallback(model, every_n_steps=2)
        if kind == "lisa":
            model = build("llama")
            return model, LISACallback(model, active_layers=2, every_n_steps=3, seed=5)
        model = _lora_cls()
        return model, LPLoRACallback(model, probe_steps=3)

    data = batches("cls" if kind == "lp_lora" else "causal", n=64)
    args = {"max_steps": 8, "save_strategy": "steps", "save_steps": 4}

    model, cb = make()
    Trainer(model=model, args=training_args(tmp_path / "a", **args), train_dataset=data, callbacks=[cb]).train()
    full = snapshot(model)
    with open(os.path.join(tmp_path / "a", "checkpoint-4", cb.filename)) as f:
        saved = json.load(f)
    assert saved["kind"] == cb.kind and saved["config"] == cb.config()

    model2, cb2 = make()
    out = tmp_path / "b"
    Trainer(
        model=model2,
        args=training_args(out, max_steps=4, save_strategy="steps", save_steps=4),
        train_dataset=data,
        callbacks=[cb2],
    ).train()
    model3, cb3 = make()
    Trainer(model=model3, args=training_args(out, **args), train_dataset=data, callbacks=[cb3]).train(
        resume_from_checkpoint=str(out / "checkpoint-4")
    )
    for n, p in model3.named_parameters():
        assert torch.equal(p, full[n]), n
    assert cb3.history == cb.history


def test_resume_with_a_different_schedule_is_refused(tmp_path):
    model = build("llama")
    cb = LISACallback(model, active_layers=2, every_n_steps=2, seed=0)
    _train(model, tmp_path, [cb], max_steps=2, save_strategy="steps", save_steps=2)
    model2 = build("llama")
    other = LISACallback(model2, active_layers=2, every_n_steps=2, seed=1)
    with pytest.raises(ValueError, match="differs"):
        _train(model2, tmp_path, [other], max_steps=4, resume=str(tmp_path / "checkpoint-2"))


def test_callback_binds_to_trainer_model_when_created_without_one(tmp_path):
    model = build("llama")
    cb = LISACallback(active_layers=1, every_n_steps=1, seed=0)
    _, rec = _train(model, tmp_path, [cb], max_steps=3)
    blocks = _blocks(model)
    for step in range(3):
        (active,) = cb.draw(step)
        assert set(blocks[active]) <= rec.trainable[step]
        assert not set(blocks[(active + 1) % 4]) & rec.trainable[step]


def test_optimizer_missing_scheduled_params_is_an_error(tmp_path):
    model = build("llama")
    optimizer = torch.optim.AdamW(model.lm_head.parameters(), lr=1e-3)
    cb = GradualUnfreezingCallback(model, every_n_steps=1)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=batches("causal"),
        callbacks=[cb],
        optimizers=(optimizer, None),
    )
    with pytest.raises(RuntimeError, match="not in the optimizer"):
        trainer.train()
