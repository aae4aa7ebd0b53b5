"""forge.layers.suggest: memory estimate vs. a fresh-process measurement, budget choice, probe."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from _memory_oracle import available as oracle_available
from _memory_oracle import rss_growth
from transformers import LlamaConfig, LlamaForCausalLM

from forge.layers.suggest import suggest_freeze

HERE = Path(__file__).parent
# Big enough that tensors dwarf allocator/runtime noise (~130 MiB peak), small enough for seconds.
CONFIG = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
BATCH, SEQ = 4, 128


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(config=CONFIG, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config))


def _batch(config=CONFIG):
    ids = torch.randint(0, config["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _measure_in_fresh_processes(freeze_lists: list[list[int]]) -> list[int]:
    """Peak RSS growth of each plan, each in its own new interpreter (started side by side)."""
    return rss_growth([{"config": CONFIG, "batch": BATCH, "seq": SEQ, "freeze": f, "steps": 2} for f in freeze_lists])


@pytest.mark.skipif(not oracle_available(), reason="needs Linux /proc to reset peak RSS")
def test_budget_choice_fits_and_estimate_within_15_percent_of_measurement():
    model = _model()
    plans = suggest_freeze(model, _batch()).plans
    assert [p.n_freeze for p in plans] == [0, 1, 2, 3, 4]
    assert all(a.peak_bytes > b.peak_bytes for a, b in itertools.pairwise(plans))  # freezing saves memory
    # A budget between the 1- and 2-block plans must choose 2.
    budget = (plans[1].peak_bytes + plans[2].peak_bytes) // 2
    chosen = suggest_freeze(model, _batch(), budget_bytes=budget)
    assert chosen.n_freeze == 2 and chosen.plan.frozen_blocks == (0, 1)
    full, frozen2 = _measure_in_fresh_processes([[], [0, 1]])
    for estimate, measured in ((plans[0].peak_bytes, full), (plans[2].peak_bytes, frozen2)):
        assert abs(estimate - measured) / measured <= 0.15, (estimate, measured)
    assert frozen2 <= budget < full
    print(
        f"\nestimate/measured MiB: k=0 {plans[0].peak_bytes / 2**20:.1f}/{full / 2**20:.1f}, "
        f"k=2 {plans[2].peak_bytes / 2**20:.1f}/{frozen2 / 2**20:.1f}"
    )


SMALL = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def test_probe_leaves_model_untouched_and_ratios_match_reference():
    model = _model(SMALL)
    model.eval()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    batch = _batch(SMALL)
    s = suggest_freeze(model, batch)
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] and p.grad is None
    # Reference ratio: plain backward with everything trainable, norms by hand.
    ref = _model(SMALL)
    ref.train()
    ref(**batch).loss.backward()
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            g = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in layer.parameters()))
            w = torch.sqrt(sum((p.float() ** 2).sum() for p in layer.parameters()))
            assert s.ratios[i] == pytest.approx(float(g / w), rel=1e-4)


def test_signal_budget_and_gradient_order():
    model = _model(SMALL)
    s = suggest_freeze(model, _batch(SMALL), max_signal_loss=0.0)
    assert s.n_freeze == 0
    total = sum(s.ratios.values())
    s = suggest_freeze(model, _batch(SMALL), max_signal_loss=(s.ratios[0] + s.ratios[1]) / total)
    assert s.n_freeze >= 2 and s.plans[s.n_freeze].signal_frozen <= (s.ratios[0] + s.ratios[1]) / total + 1e-9
    g = suggest_freeze(model, _batch(SMALL), order="gradient")
    lowest = sorted(g.ratios, key=g.ratios.get)
    assert g.plans[2].frozen_blocks == tuple(sorted(lowest[:2]))
    assert "chosen" in str(g) and "signal frozen" in str(g)


def test_nothing_fits_freezes_everything_and_apply_freezes_choice():
    model = _model(SMALL)
    s = suggest_freeze(model, _batch(SMALL), budget_bytes=1)
    assert s.n_freeze == 4 and "nothing fits" in s.reason
    s.apply(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.norm.weight", "lm_head.weight"}


def test_peft_model_plans_count_only_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(SMALL), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    s = suggest_freeze(model, _batch(SMALL))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert s.plans[0].trainable_params == lora
    assert s.plans[4].trainable_params == 0
    assert s.plans[0].peak_bytes > s.plans[4].peak_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_estimate_matches_cuda_max_memory_allocated():
    model = _model().cuda()
    batch = {k: v.cuda() for k, v in _batch().items()}
    s = suggest_freeze(model, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated()
    assert abs(s.plans[0].peak_bytes - measured) / measured <= 0.15
