"""Tests for forge.autotune: the search on synthetic memory curves, the global batch across world
sizes, backing off after a failed confirm, evaluation tuning apart from training, the probes'
side effects, Trainer/preset wiring and resuming with the saved choice. Whether the choice fits
and is close to the true maximum is judged by a fresh process's peak RSS in
``tests/test_autotune_oracle.py``; the memory model itself in ``tests/test_memory.py``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama

from forge.autotune import (
    AutotuneCallback,
    AutotuneConfig,
    autotune_batch_size,
    format_table,
    from_preset,
    parse_memory,
    sequence_length,
)
from forge.autotune.probe import StepProbe
from forge.autotune.search import fit_line, search_batch_size, split_global_batch
from forge.errors import ForgeError
from forge.recipes import autotune_preset

SEQ = 32
BUDGET = 16_000_000  # bytes: about 45 examples of 32 tokens on the tiny Llama


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and the CI box's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=0)


def _counting(measure):
    calls: list[int] = []

    def wrapped(batch: int):
        calls.append(batch)
        return measure(batch)

    return wrapped, calls


# -- the global batch ----------------------------------------------------------------------------
def _covered(result) -> bool:
    """The choice was measured to fit, or is below a batch that was (the search never guesses)."""
    return any(p.ok and p.batch_size >= result.per_device_train_batch_size for p in result.probes)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_batch_is_kept_across_world_sizes(model, world, tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=1,
                             report_to="none")
    probe, calls = _counting(StepProbe(model, SEQ))
    result = autotune_batch_size(model, training_args=args, target_global_batch=128, world_size=world,
                                 max_memory=BUDGET, seq_len=SEQ, measure=probe)
    per_device, steps = args.per_device_train_batch_size, args.gradient_accumulation_steps
    assert (per_device, steps) == (result.per_device_train_batch_size, result.gradient_accumulation_steps)
    assert per_device * steps * world == 128
    assert _covered(result)
    assert per_device >= result.max_per_device // 2  # never far below what memory allows
    assert len(calls) == len(result.probes) <= 5
    # The memory limit (about 45) is below the per-device share for 1 and 2 processes.
    assert steps == {1: 4, 2: 2, 4: 1}[world]


def test_closest_global_batch_is_stated_when_not_divisible(model):
    result = autotune_batch_size(model, target_global_batch=61, world_size=2, max_memory=BUDGET, seq_len=SEQ)
    assert result.global_batch == 62 and not result.exact
    assert any("closest" in note for note in result.notes)


@pytest.mark.parametrize("failure", ["oom", "over_budget"])
def test_failing_confirm_probe_backs_off(model, failure):
    honest = StepProbe(model, SEQ)  # the measurement the search is given; failures injected below
    first = autotune_batch_size(model, max_memory=BUDGET, seq_len=SEQ, measure=honest)
    too_big = first.per_device_train_batch_size

    def flaky(batch: int):
        if batch >= too_big:  # the confirm probe at the predicted size fails
            return None if failure == "oom" else BUDGET + 1
        return honest(batch)

    result = autotune_batch_size(model, max_memory=BUDGET, seq_len=SEQ, measure=flaky)
    failed = [p for p in result.probes if not p.ok]
    assert [p.batch_size for p in failed] == [too_big]
    assert failed[0].role == "confirm"
    assert failed[0].bytes == (None if failure == "oom" else BUDGET + 1)
    assert result.backed_off
    assert result.per_device_train_batch_size < too_big
    assert _covered(result)
    assert len(result.probes) <= 5
    assert any("backed off" in note for note in result.notes)


def test_eval_tuning_leaves_the_train_batch_alone(model, tmp_path):
    from transformers import TrainingArguments

    def args():
        return TrainingArguments(str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=4,
                                 per_device_eval_batch_size=8, report_to="none")

    plain_args, eval_args = args(), args()
    plain = autotune_batch_size(model, training_args=plain_args, max_memory=BUDGET, seq_len=SEQ)

    def tight_eval(batch: int):  # a quarter of the budget per example: 3 fit, 4 do not
        return batch * BUDGET // 4

    tuned = autotune_batch_size(model, training_args=eval_args, max_memory=BUDGET, seq_len=SEQ,
                                tune_eval=True, eval_measure=tight_eval)
    assert tuned.per_device_eval_batch_size == eval_args.per_device_eval_batch_size == 3
    assert plain.per_device_eval_batch_size is None and plain_args.per_device_eval_batch_size == 8
    assert (eval_args.per_device_train_batch_size, eval_args.gradient_accumulation_steps) == \
        (plain_args.per_device_train_batch_size, plain_args.gradient_accumulation_steps)
    assert [p.batch_size for p in tuned.probes] == [p.batch_size for p in plain.probes]


def test_eval_budget_is_the_budget_less_the_optimizer_state(model):
    result = autotune_batch_size(model, max_memory=BUDGET, seq_len=SEQ, tune_eval=True, max_eval_batch=512)
    adam_state = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    assert adam_state <= result.optimizer_bytes and result.eval_budget == BUDGET - result.optimizer_bytes
    assert any(p.ok and p.batch_size >= result.per_device_eval_batch_size for p in result.eval_probes)
    assert len(result.eval_probes) <= 5


# -- the measurement ----------------------------------------------------------------------------
def test_probes_leave_weights_rng_and_grads_untouched():
    model = make_tiny_llama(seed=4)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1  # the probes' training steps draw random numbers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.train(False)
    autotune_batch_size(model, max_memory=BUDGET, seq_len=SEQ, tune_eval=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_activation_checkpointing_is_probed_as_the_run_will_use_it(model, tmp_path):
    from transformers import TrainingArguments

    def tuned(checkpointing: bool):
        args = TrainingArguments(str(tmp_path), per_device_train_batch_size=128, report_to="none",
                                 activation_checkpointing=checkpointing)
        return autotune_batch_size(model, training_args=args, max_memory=BUDGET, seq_len=SEQ)

    plain, checkpointed = tuned(False), tuned(True)
    # The blocks' saved activations go; the logits and the loss's backward stay.
    assert checkpointed.fit.per_sample < 0.6 * plain.fit.per_sample
    assert checkpointed.per_device_train_batch_size >= 1.5 * plain.per_device_train_batch_size
    assert not model.is_activation_checkpointing  # switched off again; the Trainer turns it on


# -- the search on its own (synthetic memory curves) ----------------------------------------------
@pytest.mark.parametrize("curve", ["linear", "convex", "noisy"])
def test_search_on_synthetic_curves(curve):
    budget = 10_000

    def measure(batch: int) -> int:
        base = 1000 + 37 * batch
        if curve == "convex":
            base += int(0.05 * batch**2)
        if curve == "noisy":
            base += (batch * 7919) % 50
        return base

    true_max = max(b for b in range(1, 1000) if measure(b) <= budget)
    out = search_batch_size(measure, budget, cap=10_000)
    assert measure(out.batch_size) <= budget
    assert out.batch_size >= 0.9 * true_max, (out.batch_size, true_max)
    assert len(out.probes) <= 5


def test_a_flat_start_does_not_flatten_the_line():
    # At small batches a step's peak is its optimizer step (gradients and temporaries, fixed);
    # the forward/backward part, linear in the batch, is what the line is fitted on.
    def measure(batch: int) -> tuple[int, int]:
        forward_backward = 1000 + 40 * batch
        return max(3000, forward_backward), forward_backward

    out = search_batch_size(measure, budget=10_000, cap=100_000)
    true_max = (10_000 - 1000) // 40
    assert 0.9 * true_max <= out.batch_size <= true_max
    assert all(p.ok for p in out.probes) and len(out.probes) <= 5  # never a probe at the cap


def test_back_off_failing_twice_falls_back_to_a_probed_batch():
    out = search_batch_size(lambda b: 100 + 10 * b if b <= 20 else None, budget=1100, cap=1000)
    assert out.backed_off and out.batch_size <= 20
    assert [p.role for p in out.probes] == ["fit", "fit", "refine", "confirm", "back-off"]
    assert out.batch_size == max(p.batch_size for p in out.probes if p.ok)


def test_nothing_fits_is_reported(model):
    with pytest.raises(ForgeError, match="not even one example"):
        autotune_batch_size(model, max_memory="100KB", seq_len=SEQ)


def test_cpu_needs_an_explicit_budget(model):
    with pytest.raises(ForgeError, match="max_memory"):
        autotune_batch_size(model, seq_len=SEQ)


@pytest.mark.parametrize("limit,target,world,expected", [
    (40, 64, 1, (32, 2, 64)), (45, 128, 2, (32, 2, 128)), (100, 64, 4, (16, 1, 64)),
    (30, 62, 1, (21, 3, 63)), (7, 3, 4, (1, 1, 4)), (12, None, 2, (12, 1, 24)),
])
def test_split_global_batch(limit, target, world, expected):
    assert split_global_batch(limit, target, world) == expected


def test_fit_line_is_least_squares():
    fit = fit_line([(1, 11), (2, 19), (4, 41)])
    xs, ys = torch.tensor([1.0, 2, 4]), torch.tensor([11.0, 19, 41])
    solution = torch.linalg.lstsq(torch.stack([torch.ones(3), xs], 1), ys[:, None]).solution
    assert fit.intercept == pytest.approx(float(solution[0]), abs=1e-4)
    assert fit.per_sample == pytest.approx(float(solution[1]), abs=1e-4)


# -- inputs ------------------------------------------------------------------------------------
def test_parse_memory():
    assert parse_memory("20GB") == 20 * 10**9
    assert parse_memory("16GiB") == 16 * 2**30
    assert parse_memory("1.5 MB") == 1_500_000
    assert parse_memory("90%", total=1000) == 900
    assert parse_memory(123) == 123
    for bad in ("lots", "12XB", "0%"):
        with pytest.raises(ForgeError):
            parse_memory(bad, total=1000)
    with pytest.raises(ForgeError, match="accelerator"):
        parse_memory("50%")


def test_sequence_length_from_conversational_rows():
    from forge.demo import builtin_tokenizer
    from forge.recipes.data import load_examples

    tok = builtin_tokenizer()
    ds = load_examples("builtin:demo-sft")
    lengths = sorted(len(tok.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in ds)
    assert sequence_length(ds, tok) == lengths[-1]
    assert sequence_length(ds, tok, percentile=50) == lengths[len(lengths) // 2 - 1]
    assert sequence_length(ds, tok, max_length=10) == 10
    assert sequence_length(ds, tok, max_length=64, packing=True) == 64
    with pytest.raises(ForgeError, match="tokenizer"):
        sequence_length(ds)


def test_preference_rows_probe_two_sequences_per_example(model):
    from forge.demo import builtin_tokenizer
    from forge.recipes.data import load_examples

    tok = builtin_tokenizer()
    ds = load_examples("builtin:demo-dpo", method="dpo")
    longest = max(max(len(tok.apply_chat_template(r["prompt"] + r[k], tokenize=True)["input_ids"])
                      for k in ("chosen", "rejected")) for r in ds)
    assert sequence_length(ds, tok) == longest
    dpo = autotune_batch_size(model, dataset=ds, seq_len=SEQ, max_memory=BUDGET)
    sft = autotune_batch_size(model, seq_len=SEQ, max_memory=BUDGET)
    # Chosen and rejected both run through the model: half the examples fit.
    assert abs(2 * dpo.per_device_train_batch_size - sft.per_device_train_batch_size) <= 2


def test_config_validation():
    assert AutotuneConfig().enabled is False
    with pytest.raises(ValueError, match="safety_margin"):
        AutotuneConfig(safety_margin=0.7)
    with pytest.raises(ValueError, match="max_memory"):
        AutotuneConfig(max_memory="plenty")


# -- wiring: Trainer, preset, resume --------------------------------------------------------------
def _rows(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(0, 128, (20 + i % 13,), generator=gen)  # lengths 20..32
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _pad(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_trainer_gets_the_choice_and_trains_with_it(model, tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=16,
                             max_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    trainer = Trainer(model=make_tiny_llama(seed=1), args=args, train_dataset=_rows(256), data_collator=_pad)
    result = autotune_batch_size(trainer, max_memory=BUDGET)
    assert result.seq_len == 32  # the longest row
    assert result.target_global_batch == 64 and result.global_batch == 64
    assert trainer.args.per_device_train_batch_size == result.per_device_train_batch_size == 32
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 32
    assert any(isinstance(cb, AutotuneCallback) for cb in trainer.callback_handler.callbacks)
    assert "choice: per_device_train_batch_size 32" in format_table(result)


def test_checkpoint_records_the_choice_and_resume_reuses_it(tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=8,
                             max_steps=2, save_steps=1, report_to="none", disable_tqdm=True)
    trainer = Trainer(model=make_tiny_llama(seed=2), args=args, train_dataset=_rows(64), data_collator=_pad)
    first = autotune_batch_size(trainer, max_memory=BUDGET)
    trainer.train()
    saved = json.loads((tmp_path / "checkpoint-1" / "autotune.json").read_text())
    assert saved["per_device_train_batch_size"] == first.per_device_train_batch_size
    assert AutotuneCallback(first).state_dict() == saved

    # Resuming on a "smaller GPU": the saved choice wins and nothing is probed.
    resumed_args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=8,
                                     report_to="none")
    result = autotune_batch_size(make_tiny_llama(seed=2), training_args=resumed_args, max_memory="3MB",
                                 seq_len=SEQ, resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert result.mode == "reused" and result.probes == []
    assert resumed_args.per_device_train_batch_size == first.per_device_train_batch_size
    restored = AutotuneCallback()
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved


def test_from_preset_tunes_training_args_in_place(capsys):
    import forge
    from forge.demo import builtin_tokenizer
    from forge.recipes.data import load_examples

    preset = forge.load_preset("demo", {"training.per_device_train_batch_size": 4,
                                        "training.gradient_accumulation_steps": 8})
    args = preset.training_args()
    tiny = make_tiny_llama(seed=3)
    assert from_preset(AutotuneConfig(), tiny, args) == {}
    assert args.per_device_train_batch_size == 4
    extra = from_preset(AutotuneConfig(enabled=True, max_memory="30MB"), tiny, args,
                        load_examples("builtin:demo-sft"), builtin_tokenizer())
    assert [type(cb) for cb in extra["callbacks"]] == [AutotuneCallback]
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 32
    assert args.per_device_train_batch_size > 4
    assert "choice: per_device_train_batch_size" in capsys.readouterr().out


def test_autotune_preset_on_the_demo():
    import forge

    result = autotune_preset(forge.load_preset("demo"), max_memory="200MB", target_global_batch=64)
    assert result.global_batch == 64 and 1 <= len(result.probes) <= 5
    assert result.seq_len <= 128
    with pytest.raises(ForgeError, match="max_memory"):
        autotune_preset(forge.load_preset("demo"))
