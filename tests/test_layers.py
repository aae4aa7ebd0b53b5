"""forge.layers: discovery and static freezing on ten architecture families and through PEFT."""

from __future__ import annotations

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

from forge.layers import (
    find_layers,
    freeze_layers,
    freeze_table,
    set_trainable_,
    trainable_universe,
    unfreeze_all,
)

NAMES = list(FAMILIES)
TRAIN_FAMILIES = ["llama", "gpt2", "gpt_neox", "opt", "falcon", "t5", "bert"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", NAMES)
def test_discovery_matches_reference_layout(name):
    model, family = build(name), FAMILIES[name]
    info = find_layers(model)
    expected = expected_block_params(model, family)
    assert info.num_blocks == len(expected)
    assert [info.groups[f"block.{i}"] for i in range(info.num_blocks)] == [tuple(b) for b in expected]
    assert info.stacks == tuple(family.stacks)
    # Embeddings: the reference modules' parameters, and the input embedding weight itself.
    named = dict(model.named_parameters())
    want_emb = {n for n in named if any(n.startswith(e + ".") for e in family.embeddings)}
    assert set(info.groups["embeddings"]) == want_emb
    emb_weight = model.get_input_embeddings().weight
    assert any(named[n] is emb_weight for n in info.groups["embeddings"])
    # Head: tied iff the output weight is the input weight.
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb_weight
    assert info.tied_head == tied
    if family.head_param is not None:
        assert family.head_param in info.groups["head"]
    # Every parameter lands in exactly one group.
    flat = [n for names in info.groups.values() for n in names]
    assert sorted(flat) == sorted(named)


@pytest.mark.parametrize("name", NAMES)
def test_freeze_by_ratio_indices_and_switches(name):
    model, family = build(name), FAMILIES[name]
    blocks = expected_block_params(model, family)
    n = len(blocks)
    named = dict(model.named_parameters())
    emb = {x for x in named if any(x.startswith(e + ".") for e in family.embeddings)}

    freeze_layers(model, ratio=0.5)
    assert set(named) - _trainable(model) == {x for b in blocks[: n // 2] for x in b}

    unfreeze_all(model)
    assert _trainable(model) == set(named)
    middle = n // 2
    freeze_layers(model, indices=[middle, -1], embeddings=True)
    want = {x for i in {middle, n - 1} for x in blocks[i]} | emb
    assert set(named) - _trainable(model) == want

    unfreeze_all(model)
    freeze_layers(model, first=1, last=1)
    assert set(named) - _trainable(model) == set(blocks[0]) | set(blocks[-1])


def test_head_switch_and_pattern_on_untied_model():
    model = build("llama")
    named = dict(model.named_parameters())
    report = freeze_layers(model, head=True, pattern=r"\.mlp\.")
    assert set(named) - _trainable(model) == {"lm_head.weight"} | {n for n in named if ".mlp." in n}
    assert "head" in report.frozen_parts()
    freeze_layers(model, head=False)
    assert named["lm_head.weight"].requires_grad


def test_tied_head_conflict_raises_and_tied_freeze_reaches_embeddings():
    model = build("gpt2")
    with pytest.raises(ValueError, match="tied"):
        freeze_layers(model, embeddings=False, head=True)
    freeze_layers(model, head=True)
    assert not model.get_input_embeddings().weight.requires_grad


@pytest.mark.parametrize("kwargs", [{"ratio": 1.5}, {"first": 9}, {"pattern": "("}])
def test_invalid_selection_raises(kwargs):
    with pytest.raises(ValueError):
        freeze_layers(build("llama"), **kwargs)


def test_out_of_range_index_raises():
    with pytest.raises(IndexError):
        freeze_layers(build("llama"), indices=[4])
    with pytest.raises(IndexError):
        freeze_layers(build("llama"), indices=[-5])


def test_report_counts_match_parameters():
    model = build("t5")
    report = freeze_layers(model, indices=[1])
    total = sum(p.numel() for p in model.parameters())
    assert report.total == total
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = next(r for r in report.rows if r[0] == "block.1")
    enc1 = sum(p.numel() for p in model.encoder.block[1].parameters())
    assert row[1:] == ("encoder.block.1", 0, enc1)
    text = str(report)
    assert "encoder.block.1" in text and "decoder.block.1" in text


def _lora(model, **kwargs):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kwargs))


def test_peft_discovery_and_freezing_keep_adapters():
    peft_model = _lora(build("llama"))
    info = find_layers(peft_model)
    assert info.num_blocks == 4
    assert info.stacks == ("base_model.model.model.layers",)
    named = dict(peft_model.named_parameters())
    lora = {n for n in named if "lora_" in n}
    assert set(trainable_universe(peft_model)) == lora
    freeze_layers(peft_model, ratio=0.5)
    bottom = {n for n in lora if any(f".layers.{i}." in n for i in (0, 1))}
    assert _trainable(peft_model) == lora - bottom
    # The base weights stay frozen whatever happens, and unfreeze_all restores only adapters.
    unfreeze_all(peft_model)
    assert _trainable(peft_model) == lora
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__module__.startswith("peft")
    out = peft_model(**{k: v[None] for k, v in batches("causal", n=1)[0].items()})
    assert torch.isfinite(out.loss)


def test_set_trainable_clears_stale_gradient_so_adamw_cannot_move_frozen_param():
    # Reference for the optimizer-state reasoning: a frozen param that keeps a (zero) grad is
    # still stepped by AdamW (momentum + weight decay); set_trainable_ drops the grad.
    def run(freeze):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8))
        opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.1)
        (w**2).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # leaves zeros, as some loops do
        before = w.detach().clone()
        freeze(w)
        opt.step()
        return torch.equal(w.detach(), before)

    assert not run(lambda w: w.requires_grad_(False))  # naive toggle: AdamW still moves it
    assert run(lambda w: set_trainable_([w], False))


@pytest.mark.parametrize("name", TRAIN_FAMILIES + ["lora"])
def test_frozen_params_bit_identical_after_trainer_steps(name, tmp_path):
    from transformers import Trainer

    model = _lora(build("llama")) if name == "lora" else build(name)
    kind = "causal" if name == "lora" else FAMILIES[name].kind
    freeze_layers(model, indices=[0, -1], embeddings=True if name != "lora" else None)
    frozen = set(dict(model.named_parameters())) - _trainable(model)
    before = snapshot(model)
    Trainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=batches(kind)).train()
    after = dict(model.named_parameters())
    for n in frozen:
        assert torch.equal(after[n], before[n]), n
    moved = [n for n in _trainable(model) if not torch.equal(after[n], before[n])]
    # LoRA's A matrices get no gradient while B is still zero at step 1, but B must move.
    assert moved and len(moved) >= len(_trainable(model)) // 2


def test_freeze_table_reports_without_changing():
    model = build("bert")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    report = freeze_table(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert report.trainable == report.total
    assert [r[0] for r in report.rows][:2] == ["embeddings", "block.0"]
