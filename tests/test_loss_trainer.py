"""forge.loss inside trainers: the patched forward, Trainer and TRL SFTTrainer routes, presets.

The loss is computed in the model's own forward, in the one decoder pass the trainer makes per
micro-batch (counted here with a forward hook), with no ``compute_loss_func``. References: the
unpatched model's logits through the same loss, the model's own loss, and TRL's own losses
(plain NLL, and ``loss_type="dft"`` against forge's ``dft``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from forge.loss import (
    AdaptiveLoss,
    ExampleWeightCollator,
    LossCallback,
    LossConfig,
    ResponseOnlyCollator,
    dft,
    focal,
    from_preset,
    restore_lm_head,
    use_fused_lm_head,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _count_decoder_passes(model) -> list[int]:
    calls: list[int] = []
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    base.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    return calls


def _tiny_trainer(tmp_path, model, loss_fn=None, batch=8, accum=1, steps=1, lr=1.0, **kw):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 128, (8 * steps, 12), generator=g)
    labels = ids.clone()
    for i in range(ids.shape[0]):
        labels[i, : 1 + i % 8] = -100
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=lr,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        **kw,
    )
    callbacks = [loss_fn.callback()] if loss_fn is not None else None
    return Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks)


def test_trainer_accumulation_equivalence_one_decoder_pass(tmp_path):
    deltas = []
    for batch, accum in [(8, 1), (2, 4)]:
        model = make_tiny_llama(seed=0).double()
        before = [p.detach().clone() for p in model.parameters()]
        loss_fn = AdaptiveLoss(focal(1.0)).attach(model)
        calls = _count_decoder_passes(model)
        _tiny_trainer(tmp_path / f"{batch}", model, loss_fn, batch=batch, accum=accum).train()
        assert len(calls) == accum  # one decoder forward per micro-batch
        deltas.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    for a, b in zip(*deltas):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_trainer_fused_loss_curve_matches_standard(tmp_path):
    curves = []
    for fused in (False, True):
        model = make_tiny_llama(seed=0)
        loss_fn = AdaptiveLoss().attach(model) if fused else None
        tr = _tiny_trainer(tmp_path / str(fused), model, loss_fn, batch=4, accum=2, steps=4, lr=1e-2)
        tr.train()
        curves.append([h["loss"] for h in tr.state.log_history if "loss" in h])
    assert len(curves[0]) == 4
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-5, atol=1e-5)


# ---- the patched forward: PEFT, tied embeddings, generation ---------------------------------


def _grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["tied", "lora", "lora_tied", "modules_to_save", "lora_on_head"])
def test_fused_forward_matches_logits(variant):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama(seed=1, tie_word_embeddings="tied" in variant).double()
    if variant != "tied":
        targets = ["q_proj", "v_proj"] + (["lm_head"] if variant == "lora_on_head" else [])
        save = ["lm_head"] if variant == "modules_to_save" else None
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, modules_to_save=save, lora_dropout=0.0))
        for n, p in model.named_parameters():  # non-zero LoRA B so its gradient path is exercised
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    model.train()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(7))
    labels = ids.clone()
    labels[0, :3] = -100
    loss_fn = AdaptiveLoss(focal(2.0))
    ref_loss, ref_grads = _grads_of(model, loss_fn(model(input_ids=ids), labels))  # unpatched logits
    use_fused_lm_head(model, loss_fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(input_ids=ids, labels=labels)
        fell_back = any("full logits" in str(w.message) for w in caught)
    assert (out.logits is not None) == fell_back == (variant == "lora_on_head")
    loss, grads = _grads_of(model, out.loss)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], msg=n)
    # Without labels, and in evaluation, the logits are there: the original forward.
    assert model(input_ids=ids).logits.shape == (2, 10, 128)
    model.eval()
    with torch.no_grad():
        ev = model(input_ids=ids, labels=labels)
        assert ev.logits.shape == (2, 10, 128)
        torch.testing.assert_close(ev.loss, ref_loss)
    restore_lm_head(model)


def test_fused_forward_with_gradient_checkpointing():
    model = make_tiny_llama(seed=3).double()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(10))
    ref_loss, ref_grads = _grads_of(model, AdaptiveLoss(dft())(model(input_ids=ids), ids))
    use_fused_lm_head(model, AdaptiveLoss(dft()))
    loss, grads = _grads_of(model, model(input_ids=ids, labels=ids).loss)
    torch.testing.assert_close(loss, ref_loss)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], msg=n)


def test_labels_in_forward_match_model_loss_and_generation_unchanged():
    model = make_tiny_llama(seed=2).train()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(8))
    labels = ids.clone()
    labels[1, :4] = -100
    ref = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(13)).loss
    model.eval()
    gen_ref = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    use_fused_lm_head(model).train()
    out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(13))
    assert out.logits is None and out[0] is out.loss
    torch.testing.assert_close(out.loss, ref)
    model.eval()
    assert torch.equal(model.generate(ids[:, :4], max_new_tokens=5, do_sample=False), gen_ref)
    restore_lm_head(model)
    assert "forward" not in vars(model) and "accepts_loss_kwargs" not in vars(model)


def test_example_weight_collator_padding_free():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [{"input_ids": [1, 2, 3], "w": 2.0}, {"input_ids": [4, 5], "w": 0.5}]
    padded = ExampleWeightCollator(DataCollatorForLanguageModeling(pad_token_id=0), "w")(examples)
    assert padded["loss_weights"].tolist() == [[2.0, 2.0, 2.0], [0.5, 0.5, 0.5]]
    flat = ExampleWeightCollator(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True), "w")(examples)
    assert flat["loss_weights"].tolist() == [[2.0, 2.0, 2.0, 0.5, 0.5]]


# ---- presets and TRL ------------------------------------------------------------------------


def test_loss_config_and_from_preset():
    from dataclasses import fields

    from transformers import TrainingArguments

    assert all(f.metadata.get("help") for f in fields(LossConfig))
    args = TrainingArguments(output_dir="unused", report_to="none")
    model = make_tiny_llama()
    assert from_preset(LossConfig(fused=False), model, args) == {}
    assert "forward" not in vars(model)
    kw = from_preset(LossConfig(strategy="hard_tokens", top_fraction=0.5, z_loss=1e-4), model, args)
    assert "compute_loss_func" not in kw  # the forward computes the loss: no second decoder pass
    (callback,) = kw["callbacks"]
    loss_fn = callback.loss
    assert isinstance(callback, LossCallback) and loss_fn.normalize and loss_fn.z_loss == 1e-4
    assert loss_fn.strategies[0].top_fraction == 0.5 and "forward" in vars(model)
    kw = from_preset(LossConfig(weight_column="w"), make_tiny_llama(), args)
    assert isinstance(kw["data_collator"], ExampleWeightCollator) and args.remove_unused_columns is False
    kw = from_preset(LossConfig(strategy="response_only", response_template=[3]), make_tiny_llama(), args)
    assert isinstance(kw["data_collator"], ResponseOnlyCollator) and not kw["callbacks"][0].loss.strategies
    with pytest.raises(ValueError, match="unknown"):
        from_preset(LossConfig(strategy="nope"), make_tiny_llama(), args)
    with pytest.raises(ValueError, match="label_smoothing"):
        from_preset(LossConfig(), make_tiny_llama(), TrainingArguments("unused", label_smoothing_factor=0.1))


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w1", unk_token="w0")


def _sft_run(tmp_path, cfg, peft=False, steps=2, loss_type="nll", callbacks=True, collator=None, bf16=False):
    """Logs, decoder passes and warnings of a tiny SFTTrainer run (4 rows x 2 accumulation steps)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    g = torch.Generator().manual_seed(9)
    lengths = torch.randint(6, 20, (16,), generator=g)
    rows = [[f"w{int(t)}" for t in torch.randint(4, 128, (int(n),), generator=g)] for n in lengths]
    texts = [" ".join(r[:2] + ["w3"] + r[2:]) for r in rows]  # w3: the response template
    ds = Dataset.from_dict({"text": texts, "w": [0.5 + i % 3 for i in range(16)]})
    model = make_tiny_llama(seed=0, tie_word_embeddings=peft)
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        logging_steps=1,
        report_to="none",
        learning_rate=1e-2,
        bf16=bf16,
        use_cpu=bf16,  # transformers asks for it to run bf16 autocast on a CPU
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        loss_type=loss_type,
    )
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    kwargs = from_preset(cfg, model, args) if cfg is not None else {}
    if collator is not None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        kwargs["data_collator"] = collator(DataCollatorForLanguageModeling(pad_token_id=0))
    if not callbacks:
        kwargs.pop("callbacks")
    calls = _count_decoder_passes(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=ds,
            eval_dataset=ds.select(range(4)) if peft else None,
            processing_class=_word_tokenizer(),
            peft_config=peft_config,
            **kwargs,
        )
        trainer.train()
        train_calls = len(calls)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        if peft:  # evaluation runs forge's fused head without gradients; predict adds TRL's logits pass
            logs.append(trainer.evaluate())
            preds = trainer.predict(trainer.eval_dataset.select(range(2))).predictions
            logs.append({"logits_shape": tuple(preds.shape)})
    messages = [str(w.message) for w in caught]
    return logs, train_calls, len(calls), messages


def test_sft_trainer_fused_matches_trl_with_lora_and_tied_embeddings(tmp_path):
    """forge's fused loss through PEFT + tied embeddings gives TRL's own loss and metrics."""
    ref, _, ref_calls, _ = _sft_run(tmp_path / "trl", None, peft=True)
    fused, train_calls, calls, messages = _sft_run(tmp_path / "forge", LossConfig(fused=True), peft=True)
    assert train_calls == 4  # one decoder pass per micro-batch (2 steps x 2)
    assert calls == ref_calls == 4 + 1 + 2  # evaluate: 1; predict: TRL's fused call + its logits call
    assert not any("compute_loss_func" in m or "outside forge's forward" in m for m in messages)
    for key in ("loss", "mean_token_accuracy", "entropy"):
        torch.testing.assert_close(
            torch.tensor([h[key] for h in fused[:2]]), torch.tensor([h[key] for h in ref[:2]]), rtol=1e-5, atol=1e-5
        )
    for key in ("eval_loss", "eval_mean_token_accuracy", "eval_entropy"):
        torch.testing.assert_close(fused[2][key], ref[2][key], rtol=1e-5, atol=1e-5)
    assert fused[3]["logits_shape"][-1] == 128


CONFIGS = {
    "none": LossConfig(z_loss=1e-4),
    "focal": LossConfig(strategy="focal"),
    "dft": LossConfig(strategy="dft"),
    "entropy": LossConfig(strategy="entropy"),
    "hard_tokens": LossConfig(strategy="hard_tokens", top_fraction=0.5),
    "response_only": LossConfig(strategy="response_only", response_template=[3]),
    "example_weights": LossConfig(strategy="example_weights", weight_column="w"),
    "unfused": LossConfig(strategy="focal", fused=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_decoder_forward_per_micro_batch_with_each_strategy(tmp_path, name):
    logs, train_calls, _, messages = _sft_run(tmp_path, CONFIGS[name], steps=1)
    assert train_calls == 2  # 1 step x 2 micro-batches: one decoder forward each
    assert not any("compute_loss_func" in m or "outside forge's forward" in m for m in messages), messages
    # TRL's metrics, from the same forward (forge's kernel computes them beside the loss).
    (log,) = logs
    assert 0 <= log["mean_token_accuracy"] <= 1 and log["entropy"] > 0 and math.isfinite(log["loss"])


def test_sft_dft_strategy_equals_trl_dft_loss(tmp_path):
    """forge's dft through TRL's compute_loss is TRL's own loss_type='dft' (an independent reference),
    and differs from the plain NLL: the loss that trains is forge's, not TRL's default."""
    ref, _, _, _ = _sft_run(tmp_path / "trl", None, loss_type="dft")
    nll, _, _, _ = _sft_run(tmp_path / "nll", None)
    forge, _, _, _ = _sft_run(tmp_path / "forge", LossConfig(strategy="dft"))
    for key in ("loss", "mean_token_accuracy", "entropy"):
        torch.testing.assert_close(
            torch.tensor([h[key] for h in forge]), torch.tensor([h[key] for h in ref]), rtol=1e-5, atol=1e-5
        )
    assert abs(forge[0]["loss"] - nll[0]["loss"]) > 1.0


def test_sft_response_only_equals_trl_on_masked_labels(tmp_path):
    """Prompt masking: forge's response_only loss is TRL's own NLL on labels masked beforehand
    (the collator, checked against a hand-built mask in test_loss.py), denominator included."""
    ref, _, _, _ = _sft_run(tmp_path / "trl", None, collator=lambda c: ResponseOnlyCollator(c, [3]))
    plain, _, _, _ = _sft_run(tmp_path / "plain", None)
    forge, _, _, _ = _sft_run(tmp_path / "forge", LossConfig(strategy="response_only", response_template=[3]))
    for key in ("loss", "mean_token_accuracy", "entropy"):
        torch.testing.assert_close(
            torch.tensor([h[key] for h in forge]), torch.tensor([h[key] for h in ref]), rtol=1e-5, atol=1e-5
        )
    assert abs(forge[0]["loss"] - plain[0]["loss"]) > 1e-3
    assert 0 < forge[0]["forge/loss/supervised_fraction"] < 0.9


def test_sft_bf16_autocast_reaches_forge_under_accelerate(tmp_path):
    """bf16: accelerate wraps the forward in autocast when training starts; forge's forward stays
    below that wrapper (and below TRL's head), so its matmuls run in bf16 like TRL's own."""
    ref, _, _, _ = _sft_run(tmp_path / "trl", None, bf16=True)
    fp32, _, _, _ = _sft_run(tmp_path / "fp32", LossConfig())
    forge, train_calls, _, messages = _sft_run(tmp_path / "forge", LossConfig(), bf16=True)
    assert train_calls == 4 and not any("outside forge's forward" in m for m in messages)
    got, want = torch.tensor([h["loss"] for h in forge]), torch.tensor([h["loss"] for h in ref])
    torch.testing.assert_close(got, want, rtol=5e-3, atol=5e-3)
    assert got[0] != fp32[0]["loss"]  # it did run in bf16


def test_sft_without_the_callback_warns_that_trl_computes_the_loss(tmp_path):
    _, _, _, messages = _sft_run(tmp_path, LossConfig(strategy="focal"), steps=1, callbacks=False)
    assert any("outside forge's forward" in m for m in messages)


def test_sft_trainer_strategy_with_weight_column_fused_equals_unfused(tmp_path):
    plain, _, _, _ = _sft_run(tmp_path / "a", LossConfig(strategy="focal", weight_column="w", fused=False))
    fused, _, _, _ = _sft_run(tmp_path / "b", LossConfig(strategy="focal", weight_column="w", fused=True))
    torch.testing.assert_close(torch.tensor([h["loss"] for h in fused]), torch.tensor([h["loss"] for h in plain]))
    assert all(h["mean_token_accuracy"] >= 0 and h["entropy"] > 0 for h in fused)


def test_example_script_runs(tmp_path):
    # One thread: tiny models run faster without thread contention on a small CPU box.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "adaptive_loss_trainer.py"), "--output-dir", str(tmp_path)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fused loss matches standard" in proc.stdout
