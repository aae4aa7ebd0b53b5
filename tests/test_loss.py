"""Tests for forge.loss: fused chunked linear + cross-entropy and adaptive token weighting.

Every check compares against an independent reference: ``torch.nn.functional.cross_entropy`` on
materialised float64 logits, direct formulas of each strategy differentiated by autograd, the
model's own loss, and unpatched Trainer / SFTTrainer runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama

from forge.loss import (
    AdaptiveLoss,
    ExampleWeightCollator,
    LossConfig,
    custom,
    dft,
    entropy,
    example_weights,
    focal,
    from_preset,
    fused_linear_cross_entropy,
    hard_tokens,
    response_only,
    restore_lm_head,
    use_fused_lm_head,
)

ROOT = Path(__file__).resolve().parents[1]
D = torch.float64


def _inputs(n=37, h=16, v=50, seed=0, bias=False, lead=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*(lead or (n,)), h, generator=g, dtype=D).requires_grad_(True)
    weight = torch.randn(v, h, generator=g, dtype=D).requires_grad_(True)
    b = torch.randn(v, generator=g, dtype=D).requires_grad_(True) if bias else None
    labels = torch.randint(0, v, hidden.shape[:-1], generator=g)
    labels.view(-1)[::4] = -100
    return hidden, weight, b, labels


def _reference(hidden, weight, bias, labels, reduction, eps=0.0, z_loss=0.0, softcap=None, scale=1.0):
    z = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    if bias is not None:
        z = z + bias
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    y = labels.reshape(-1)
    loss = F.cross_entropy(z, y, reduction="none", label_smoothing=eps)
    loss = loss + z_loss * torch.logsumexp(z, -1).square() * (y != -100)
    if reduction == "none":
        return loss.view(labels.shape)
    return loss.sum() if reduction == "sum" else loss.sum() / (y != -100).sum()


def _grads(out, tensors, grad_out=None):
    return torch.autograd.grad(out, [t for t in tensors if t is not None], grad_out)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 8, 37, 5])
@pytest.mark.parametrize(
    "kw", [{}, {"eps": 0.1, "z_loss": 1e-2, "softcap": 3.0, "scale": 0.7, "bias": True}], ids=["plain", "all"]
)
def test_matches_torch_cross_entropy_float64(reduction, chunk_size, kw):
    kw = dict(kw)
    hidden, weight, bias, labels = _inputs(bias=kw.pop("bias", False), lead=(37,) if chunk_size else (3, 13))
    out = fused_linear_cross_entropy(
        hidden,
        weight,
        labels,
        bias=bias,
        reduction=reduction,
        label_smoothing=kw.get("eps", 0.0),
        z_loss=kw.get("z_loss", 0.0),
        logit_softcap=kw.get("softcap"),
        logit_scale=kw.get("scale", 1.0),
        chunk_size=chunk_size,
    )
    ref = _reference(hidden, weight, bias, labels, reduction, **kw)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grad_out = torch.randn_like(ref)
    for a, b in zip(_grads(out, [hidden, weight, bias], grad_out), _grads(ref, [hidden, weight, bias], grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_all_ignored_and_frozen_weight():
    hidden, weight, _, labels = _inputs()
    labels[:] = -100
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    (gh, gw) = _grads(loss, [hidden, weight])
    assert loss.item() == 0 and gh.abs().sum() == 0 and gw.abs().sum() == 0
    # A frozen head (LoRA) gets no gradient buffer, the hidden gradient is still exact.
    hidden, weight, _, labels = _inputs()
    weight.requires_grad_(False)
    (gh,) = _grads(fused_linear_cross_entropy(hidden, weight, labels), [hidden])
    (rh,) = _grads(_reference(hidden, weight, None, labels, "mean"), [hidden])
    torch.testing.assert_close(gh, rh)


def test_bfloat16_close_to_float32():
    hidden, weight, _, labels = _inputs(n=64, h=32, v=300)
    ref = _reference(hidden.float(), weight.float(), None, labels, "mean")
    hb, wb = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    out = fused_linear_cross_entropy(hb, wb, labels, chunk_size=16)
    out.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_runs_under_torch_compile():
    hidden, weight, _, labels = _inputs(seed=11)
    compiled = torch.compile(lambda h, w, y: fused_linear_cross_entropy(h, w, y, chunk_size=16), backend="aot_eager")
    loss = compiled(hidden, weight, labels)
    ref = _reference(hidden, weight, None, labels, "mean")
    torch.testing.assert_close(loss, ref)
    for a, b in zip(_grads(loss, [hidden, weight]), _grads(ref, [hidden, weight])):
        torch.testing.assert_close(a, b)


# ---- strategies ------------------------------------------------------------------------------


def _head_outputs(hidden, weight, bias=None):
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=D)
    head.weight = torch.nn.Parameter(weight.detach().clone())
    if bias is not None:
        head.bias = torch.nn.Parameter(bias.detach().clone())
    return head, {"last_hidden_state": hidden, "lm_head": head, "logit_softcap": None, "logit_scale": 1.0}


def _direct(name, logits, y):
    """Per-token reference losses (shifted, flattened) straight from each strategy's formula."""
    valid = y != -100
    lp = torch.log_softmax(logits, -1)
    logp = lp.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    ce = -logp
    p = logp.exp()
    ent = -(lp.exp() * lp).sum(-1)
    if name == "plain":
        w = torch.ones_like(ce)
    elif name == "focal":
        w = (1 - p) ** 2  # gradient flows through the modulating factor
    elif name == "focal_detached":
        w = ((1 - p) ** 2).detach()
    elif name == "dft":
        w = p.detach()
    elif name == "entropy":
        w = ent.detach()
    elif name == "hard_tokens":
        k = int(torch.ceil(valid.sum() * 0.3))
        keep = torch.zeros_like(ce, dtype=torch.bool)
        keep[torch.where(valid, ce.detach(), -torch.inf).topk(k).indices] = True
        w = keep.to(ce.dtype)
    elif name == "custom_batch":  # non-elementwise: softmax of the losses over the batch
        w = torch.softmax(torch.where(valid, -logp, -torch.inf), 0) * valid.sum()
    elif name == "clamped":
        w = ((1 - p) ** 0.5).clamp(0.3, 0.8)
    w = torch.where(valid, w, torch.zeros_like(w))
    if name in ("entropy", "hard_tokens"):  # normalised to mean one by default
        w = w * valid.sum() / w.detach().sum()
    return w * torch.where(valid, ce, torch.zeros_like(ce))


STRATEGY_CASES = {
    "plain": lambda: AdaptiveLoss(),
    "focal": lambda: AdaptiveLoss(focal(2.0)),
    "focal_detached": lambda: AdaptiveLoss(focal(2.0, detach=True)),
    "dft": lambda: AdaptiveLoss(dft()),
    "entropy": lambda: AdaptiveLoss(entropy()),
    "hard_tokens": lambda: AdaptiveLoss(hard_tokens(0.3)),
    "custom_batch": lambda: AdaptiveLoss(
        custom(lambda logp, ent, y: torch.softmax(-logp, 0) * logp.numel(), needs_entropy=False)
    ),
    "clamped": lambda: AdaptiveLoss(focal(0.5), clamp_min=0.3, clamp_max=0.8),
}


@pytest.mark.parametrize("name", list(STRATEGY_CASES))
@pytest.mark.parametrize("path", ["fused", "logits"])
def test_strategy_matches_direct_formula(name, path):
    hidden, weight, _, labels = _inputs(lead=(3, 13), h=8, v=40, seed=1)
    loss_fn = STRATEGY_CASES[name]()
    head, outputs = _head_outputs(hidden, weight)
    num_items = torch.tensor(50)
    if path == "fused":
        loss = loss_fn(outputs, labels, num_items_in_batch=num_items)
        params = [hidden, head.weight]
    else:
        loss = loss_fn({"logits": hidden @ weight.t()}, labels, num_items_in_batch=num_items)
        params = [hidden, weight]
    ref = _direct(name, (hidden[:, :-1] @ weight.t()).reshape(-1, 40), labels[:, 1:].reshape(-1)).sum() / 50
    torch.testing.assert_close(loss, ref)
    ref_params = [hidden, weight]
    for a, b in zip(_grads(loss, params), _grads(ref, ref_params)):
        torch.testing.assert_close(a, b)


def test_uniform_weights_equal_plain_cross_entropy():
    hidden, weight, _, labels = _inputs(lead=(3, 13), seed=2)
    _, outputs = _head_outputs(hidden, weight)
    ones = AdaptiveLoss(custom(lambda logp, ent, y: torch.ones_like(logp), elementwise=True))(outputs, labels)
    ref = F.cross_entropy((hidden[:, :-1] @ weight.t()).reshape(-1, 50), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(ones, ref)
    tw = fused_linear_cross_entropy(hidden, weight, labels, token_weights=torch.ones(labels.shape, dtype=D))
    torch.testing.assert_close(tw, _reference(hidden, weight, None, labels, "mean"))


def test_response_only_and_example_weights():
    hidden, weight, _, labels = _inputs(lead=(2, 12), v=50, seed=3)
    labels[:, :] = torch.arange(10, 22)
    labels[0, 3:5] = torch.tensor([7, 8])  # response template [7, 8] in row 0 only
    labels[1, 5:7] = torch.tensor([7, 8])
    labels[1, 9:11] = torch.tensor([9, 9])  # instruction template ends the response
    _, outputs = _head_outputs(hidden, weight)
    loss = AdaptiveLoss(response_only([7, 8], [9, 9]))(outputs, labels)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 5:] = True
    mask[1, 7:9] = True
    ref_labels = torch.where(mask, labels, -100)
    ref = F.cross_entropy((hidden[:, :-1] @ weight.t()).reshape(-1, 50), ref_labels[:, 1:].reshape(-1), reduction="sum")
    # Masked tokens leave the numerator but the denominator stays the Trainer's (label) count.
    torch.testing.assert_close(loss, ref / (labels[:, 1:] != -100).sum())
    ex = torch.tensor([0.5, 2.0], dtype=D)
    outputs["loss_extras"] = {"loss_weights": ex}
    loss = AdaptiveLoss(example_weights())(outputs, labels, num_items_in_batch=22)
    per_tok = F.cross_entropy(
        (hidden[:, :-1] @ weight.t()).reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="none"
    )
    torch.testing.assert_close(loss, (per_tok.view(2, 11) * ex[:, None]).sum() / 22)


def test_reduction_none_with_batch_weights_backward():
    """reduction='none' recomputes in backward; the weighting's VJP uses the real output gradients."""
    from forge.loss.ops import CEOptions, chunked_linear_cross_entropy

    hidden, weight, _, labels = _inputs(seed=4)
    fn = custom(lambda logp, ent, y: torch.softmax(-logp, 0) * logp.numel(), needs_entropy=False)
    out = chunked_linear_cross_entropy(
        hidden, weight, labels, None, None, fn, CEOptions(reduction="none", chunk_size=6)
    )[0]
    z = hidden @ weight.t()
    valid = labels != -100
    ce = F.cross_entropy(z, labels, reduction="none")
    w = torch.zeros_like(ce).masked_scatter(valid, torch.softmax(ce[valid], 0) * valid.sum())
    ref = w * ce
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(ref)
    for a, b in zip(_grads(out, [hidden, weight], go), _grads(ref, [hidden, weight], go)):
        torch.testing.assert_close(a, b)


# ---- gradient accumulation -------------------------------------------------------------------


def _accumulated_grad(model, ids, labels, loss_fn, micro, use_num_items=True):
    """Trainer contract: num_items_in_batch counts shifted labels over the accumulated batch."""
    model.zero_grad()
    num_items = (labels[:, 1:] != -100).sum() if use_num_items else None
    for s in range(0, ids.shape[0], micro):
        loss_fn(model(input_ids=ids[s : s + micro]), labels[s : s + micro], num_items_in_batch=num_items).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("strategy", [None, "focal", "dft", "entropy_fixed_scale", "response"])
def test_accumulation_8x1_equals_2x4(strategy):
    model = make_tiny_llama(seed=0).double().train()
    use_fused_lm_head(model)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 128, (8, 16), generator=g)
    ids[:, 9] = 3  # a response template token in every row, after the masked prefixes below
    labels = ids.clone()
    for i in range(8):  # very different valid counts per example
        labels[i, : 1 + i] = -100
    strat = {"focal": focal(2.0), "dft": dft(), "entropy_fixed_scale": entropy(), "response": response_only([3])}
    loss_fn = AdaptiveLoss(strat.get(strategy), normalize=False, z_loss=1e-3)
    full = _accumulated_grad(model, ids, labels, loss_fn, 8)
    accum = _accumulated_grad(model, ids, labels, loss_fn, 2)
    for a, b in zip(full, accum):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # Without the Trainer's count each micro-batch averages over its own tokens: not equivalent
    # (the Trainer would then divide each micro-batch loss by the 4 accumulation steps).
    naive = _accumulated_grad(model, ids, labels, loss_fn, 2, use_num_items=False)
    assert max((a - b / 4).abs().max() for a, b in zip(full, naive)) > 1e-6


def _tiny_trainer(tmp_path, model, compute_loss_func=None, batch=8, accum=1, steps=1, lr=1.0, **kw):
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
    return Trainer(model=model, args=args, train_dataset=ds, compute_loss_func=compute_loss_func)


def test_trainer_accumulation_equivalence(tmp_path):
    deltas = []
    for batch, accum in [(8, 1), (2, 4)]:
        model = make_tiny_llama(seed=0).double()
        before = [p.detach().clone() for p in model.parameters()]
        loss_fn = AdaptiveLoss(focal(1.0)).attach(model)
        _tiny_trainer(tmp_path / f"{batch}", model, loss_fn, batch=batch, accum=accum).train()
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


def _model_grads(model, ids, labels, loss_fn):
    model.zero_grad()
    loss = loss_fn(model(input_ids=ids), labels, num_items_in_batch=None)
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
    ref_loss, ref_grads = _model_grads(model, ids, labels, loss_fn)
    use_fused_lm_head(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(input_ids=ids)
        fell_back = any("full logits" in str(w.message) for w in caught)
    assert (out.logits is not None) == fell_back == (variant == "lora_on_head")
    loss, grads = _model_grads(model, ids, labels, loss_fn)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], msg=n)
    # Eval and generation keep the original forward.
    model.eval()
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (2, 10, 128)
    restore_lm_head(model)


def test_fused_forward_with_gradient_checkpointing():
    model = make_tiny_llama(seed=3).double()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(10))
    ref_loss, ref_grads = _model_grads(model, ids, ids, AdaptiveLoss(dft()))
    use_fused_lm_head(model)
    loss, grads = _model_grads(model, ids, ids, AdaptiveLoss(dft()))
    torch.testing.assert_close(loss, ref_loss)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], msg=n)


def test_decoder_output_is_never_reused_stale():
    model = make_tiny_llama(seed=4).train()
    use_fused_lm_head(model)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(12))
    model(input_ids=ids).last_hidden_state.sum().backward()
    with torch.no_grad():
        for p in model.parameters():  # an optimizer step, in place
            p.add_(0.1 * torch.randn_like(p))
        direct = model.model(input_ids=ids).last_hidden_state  # same inputs, as TRL's metrics call
        after = model(input_ids=ids).logits
    restore_lm_head(model)
    with torch.no_grad():
        torch.testing.assert_close(direct, model.model(input_ids=ids).last_hidden_state)
        torch.testing.assert_close(after, model(input_ids=ids).logits)


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
    loss_fn = kw["compute_loss_func"]
    assert isinstance(loss_fn, AdaptiveLoss) and loss_fn.normalize and loss_fn.z_loss == 1e-4
    assert loss_fn.strategies[0].top_fraction == 0.5 and "forward" in vars(model)
    kw = from_preset(LossConfig(weight_column="w"), make_tiny_llama(), args)
    assert isinstance(kw["data_collator"], ExampleWeightCollator) and args.remove_unused_columns is False
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


def _sft_run(tmp_path, cfg, peft=False):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    g = torch.Generator().manual_seed(9)
    lengths = torch.randint(6, 20, (16,), generator=g)
    texts = [" ".join(f"w{int(t)}" for t in torch.randint(2, 128, (int(n),), generator=g)) for n in lengths]
    ds = Dataset.from_dict({"text": texts, "w": [0.5 + i % 3 for i in range(16)]})
    model = make_tiny_llama(seed=0, tie_word_embeddings=peft)
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        logging_steps=1,
        report_to="none",
        learning_rate=1e-2,
        bf16=False,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    kwargs = from_preset(cfg, model, args) if cfg is not None else {}
    layer_calls = []
    model.model.layers[0].register_forward_hook(lambda *a: layer_calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's deprecation notice for compute_loss_func
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
        logs = [h for h in trainer.state.log_history if "loss" in h]
        if peft:  # evaluation and prediction read the logits of the unpatched (eval-mode) forward
            logs.append(trainer.evaluate())
            preds = trainer.predict(trainer.eval_dataset.select(range(2))).predictions
            logs.append({"logits_shape": tuple(preds.shape)})
    return logs, len(layer_calls)


def test_sft_trainer_fused_matches_trl_with_lora_and_tied_embeddings(tmp_path):
    """forge's fused loss through PEFT + tied embeddings gives TRL's own loss and metrics."""
    ref, ref_calls = _sft_run(tmp_path / "trl", None, peft=True)
    fused, calls = _sft_run(tmp_path / "forge", LossConfig(fused=True), peft=True)
    # TRL's metrics call reuses the training forward's decoder output: one decoder pass per micro-batch.
    assert calls == ref_calls == 4 + 3  # 4 micro-batches, then evaluate (1) and predict (2)
    for key in ("loss", "mean_token_accuracy", "entropy"):
        torch.testing.assert_close(
            torch.tensor([h[key] for h in fused[:2]]), torch.tensor([h[key] for h in ref[:2]]), rtol=1e-5, atol=1e-5
        )
    for key in ("eval_loss", "eval_mean_token_accuracy"):
        torch.testing.assert_close(fused[2][key], ref[2][key], rtol=1e-5, atol=1e-5)
    assert fused[3]["logits_shape"][-1] == 128


def test_sft_trainer_strategy_with_weight_column_fused_equals_unfused(tmp_path):
    plain, _ = _sft_run(tmp_path / "a", LossConfig(strategy="focal", weight_column="w", fused=False))
    fused, _ = _sft_run(tmp_path / "b", LossConfig(strategy="focal", weight_column="w", fused=True))
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
