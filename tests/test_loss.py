"""Tests for forge.loss: fused chunked linear + cross-entropy and adaptive token weighting.

Every check compares against an independent reference: ``torch.nn.functional.cross_entropy`` on
materialised float64 logits (or on labels masked by hand), direct formulas of each strategy
differentiated by autograd, and a record of the matmuls the kernel dispatches (grad mode,
autocast). Trainer and TRL routes: ``test_loss_trainer.py``; Triton kernels: ``test_loss_triton.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

from forge.loss import (
    AdaptiveLoss,
    custom,
    dft,
    entropy,
    example_weights,
    focal,
    fused_linear_cross_entropy,
    hard_tokens,
    response_only,
    use_fused_lm_head,
)

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


def _templated_labels():
    hidden, weight, _, labels = _inputs(lead=(2, 12), v=50, seed=3)
    labels[:, :] = torch.arange(10, 22)
    labels[0, 3:5] = torch.tensor([7, 8])  # response template [7, 8] in row 0 only
    labels[1, 5:7] = torch.tensor([7, 8])
    labels[1, 9:11] = torch.tensor([9, 9])  # instruction template ends the response
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 5:] = True
    mask[1, 7:9] = True
    return hidden, weight, labels, mask


def test_response_only_is_prompt_masking():
    """Masked tokens leave numerator and denominator: F.cross_entropy on -100-masked labels."""
    hidden, weight, labels, mask = _templated_labels()
    _, outputs = _head_outputs(hidden, weight)
    ref_labels = torch.where(mask, labels, -100)
    logits = (hidden[:, :-1] @ weight.t()).reshape(-1, 50)
    ref = F.cross_entropy(logits, ref_labels[:, 1:].reshape(-1))  # mean over the response tokens only
    for path_outputs in (outputs, {"logits": hidden @ weight.t()}):
        loss = AdaptiveLoss(response_only([7, 8], [9, 9]))(path_outputs, labels)
        torch.testing.assert_close(loss, ref)
        (a,) = _grads(loss, [hidden])
        (b,) = torch.autograd.grad(ref, [hidden], retain_graph=True)
        torch.testing.assert_close(a, b)
    # The Trainer's count was taken from the unmasked labels: the loss refuses it, the collator fixes it.
    with pytest.raises(ValueError, match="ResponseOnlyCollator"):
        AdaptiveLoss(response_only([7, 8]))(outputs, labels, num_items_in_batch=22)


def test_response_only_collator_masks_labels_padding_free():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from forge.loss import ResponseOnlyCollator

    _, _, labels, mask = _templated_labels()
    examples = [{"input_ids": row.tolist()} for row in labels]
    batch = ResponseOnlyCollator(DataCollatorForLanguageModeling(pad_token_id=0), [7, 8], [9, 9])(examples)
    assert torch.equal(batch["labels"], torch.where(mask, labels, -100))
    # Padding-free: one row; the second example's prompt is not part of the first one's response.
    flat = ResponseOnlyCollator(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True), [7, 8])
    got = flat([{"input_ids": [1, 7, 8, 4, 5]}, {"input_ids": [6, 6, 7, 8, 3]}])["labels"]
    assert got.tolist() == [[-100, -100, -100, 4, 5, -100, -100, -100, -100, 3]]


def test_example_weights():
    hidden, weight, labels, _ = _templated_labels()
    _, outputs = _head_outputs(hidden, weight)
    ex = torch.tensor([0.5, 2.0], dtype=D)
    outputs["loss_extras"] = {"loss_weights": ex}
    loss = AdaptiveLoss(example_weights())(outputs, labels, num_items_in_batch=22)
    per_tok = F.cross_entropy(
        (hidden[:, :-1] @ weight.t()).reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="none"
    )
    torch.testing.assert_close(loss, (per_tok.view(2, 11) * ex[:, None]).sum() / 22)


class _MatmulLog(TorchDispatchMode):
    """Records the input dtypes of every matmul dispatched while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.calls.append(tuple(a.dtype for a in args if torch.is_tensor(a)))
        return func(*args, **(kwargs or {}))


def test_no_grad_does_no_gradient_work():
    """Under no_grad (evaluation) one matmul per chunk, the statistics; with gradients three."""
    hidden, weight, _, labels = _inputs(n=40, seed=12)
    chunks = -(-int((labels != -100).sum()) // 8)
    with torch.no_grad(), _MatmulLog() as log:
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    assert len(log.calls) == chunks and loss.grad_fn is None
    torch.testing.assert_close(loss, _reference(hidden, weight, None, labels, "mean"))
    with _MatmulLog() as log:
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    assert len(log.calls) == 3 * chunks


def test_bf16_autocast_runs_the_matmuls_in_bf16():
    """fp32 weights under bf16 autocast: every vocabulary matmul in bf16, as nn.Linear would be."""
    g = torch.Generator().manual_seed(13)
    hidden = torch.randn(48, 32, generator=g).requires_grad_(True)
    weight = (torch.randn(300, 32, generator=g) * 0.3).requires_grad_(True)
    labels = torch.randint(0, 300, (48,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16), _MatmulLog() as log:
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=16)
        model_path = F.cross_entropy(F.linear(hidden, weight).float(), labels)  # what the model computes
    assert log.calls and all(set(c) == {torch.bfloat16} for c in log.calls), log.calls
    fp32 = _reference(hidden, weight, None, labels, "mean")
    # As close to the model's own bf16 path as bf16 allows, and not the fp32 number.
    assert abs(loss.item() - model_path.item()) < 2e-2 and loss.item() != fp32.item()
    gh, gw = _grads(loss, [hidden, weight])
    rh, rw = _grads(fp32, [hidden, weight])
    assert gh.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(gw, rw, rtol=0, atol=2e-3)
    torch.testing.assert_close(gh, rh, rtol=0, atol=2e-3)


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


def _accumulated_grad(model, ids, labels, loss_fn, micro, use_num_items=True, extras=None):
    """Trainer contract: num_items_in_batch counts shifted labels over the accumulated batch."""
    model.zero_grad()
    use_fused_lm_head(model, loss_fn)
    num_items = (labels[:, 1:] != -100).sum() if use_num_items else None
    for s in range(0, ids.shape[0], micro):
        part = {k: v[s : s + micro] for k, v in (extras or {}).items()}
        out = model(input_ids=ids[s : s + micro], labels=labels[s : s + micro], num_items_in_batch=num_items, **part)
        assert out.logits is None  # the fused head
        out.loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("strategy", [None, "focal", "dft", "entropy_fixed_scale", "weights"])
def test_accumulation_8x1_equals_2x4(strategy):
    model = make_tiny_llama(seed=0).double().train()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 128, (8, 16), generator=g)
    labels = ids.clone()
    for i in range(8):  # very different valid counts per example
        labels[i, : 1 + i] = -100
    strat = {"focal": focal(2.0), "dft": dft(), "entropy_fixed_scale": entropy(), "weights": example_weights()}
    loss_fn = AdaptiveLoss(strat.get(strategy), normalize=False, z_loss=1e-3)
    extras = {"loss_weights": torch.linspace(0.5, 2.0, 8, dtype=D)[:, None].expand(8, 16)}
    full = _accumulated_grad(model, ids, labels, loss_fn, 8, extras=extras)
    accum = _accumulated_grad(model, ids, labels, loss_fn, 2, extras=extras)
    for a, b in zip(full, accum):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # Without the Trainer's count each micro-batch averages over its own tokens: not equivalent
    # (the Trainer would then divide each micro-batch loss by the 4 accumulation steps).
    naive = _accumulated_grad(model, ids, labels, loss_fn, 2, use_num_items=False, extras=extras)
    assert max((a - b / 4).abs().max() for a, b in zip(full, naive)) > 1e-6
