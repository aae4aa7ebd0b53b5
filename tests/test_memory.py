"""forge.core.memory: the one memory model (autotune and suggest_freeze), judged by the peak RSS
growth of a fresh process running the same training, never by itself."""

from __future__ import annotations

import functools

import pytest
import torch
from _memory_oracle import available as oracle_available
from _memory_oracle import rss_growth
from transformers import LlamaConfig, LlamaForCausalLM

from forge.core.memory import FORWARD_BACKWARD, OPTIMIZER, LiveBytes, StepMemory, storage_bytes
from forge.layers import freeze_layers

pytestmark = pytest.mark.usefixtures("one_thread")

# The model: a large vocabulary over a small hidden size, where the logits and the
# cross-entropy's backward transients dominate (a sum of categories saw half the peak).
CONFIG = {"vocab_size": 8192, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2}
BATCH, SEQ = 8, 128
MIB = 2**20


def _model(freeze: list[int] | None = None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    if freeze:
        freeze_layers(model, indices=freeze, embeddings=True)
    return model


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@functools.cache
def _estimate(freeze: tuple[int, ...] = (), accumulation: int = 1, max_grad_norm: float = 1.0) -> int:
    memory = StepMemory(_model(list(freeze)), optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=0.0),
                        accumulation_steps=accumulation, max_grad_norm=max_grad_norm)
    return memory.measure(_batch()).peak_bytes


# Clipped as the Trainer clips by default; one fresh process each (an interpreter costs ~8 s of CPU).
CASES = {
    "plain": {"max_grad_norm": 1.0},
    "accumulation": {"accumulation": 2, "max_grad_norm": 1.0},
    "frozen": {"freeze": (0,), "max_grad_norm": 1.0},
}


@pytest.fixture(scope="module")
def measured() -> dict[str, int]:
    """The oracle: peak RSS growth of each case in its own fresh interpreter, side by side."""
    if not oracle_available():
        pytest.skip("needs Linux /proc to reset peak RSS")
    specs = [{"config": CONFIG, "batch": BATCH, "seq": SEQ, **case} for case in CASES.values()]
    return dict(zip(CASES, rss_growth(specs)))


@pytest.mark.parametrize("case", list(CASES))
def test_step_peak_matches_a_fresh_process(measured, case):
    estimate = _estimate(**CASES[case])
    # Kernel libraries keep a little workspace outside tensors, so the oracle sits a bit above.
    assert -0.05 <= (estimate - measured[case]) / measured[case] <= 0.02, (case, estimate / MIB,
                                                                           measured[case] / MIB)


def test_held_gradients_and_frozen_blocks_move_the_peak_as_measured(measured):
    # Under accumulation the previous micro-batch's gradients stay alive through the next one:
    # the oracle's extra peak is about one gradient copy, and the model must see the same.
    grads = storage_bytes(p for p in _model().parameters())
    assert measured["accumulation"] - measured["plain"] == pytest.approx(grads, rel=0.25)
    # The RSS difference moves with the allocator's page reuse by up to ~1 MiB (a clean CI venv
    # measured 3.53 MiB where the model says 4.28 MiB): the same 25% the line above allows.
    assert _estimate(accumulation=2) - _estimate() == pytest.approx(measured["accumulation"] - measured["plain"],
                                                                     abs=max(0.75 * MIB, 0.25 * grads))
    saving = measured["plain"] - measured["frozen"]
    assert saving > 4 * MIB
    assert _estimate() - _estimate(freeze=(0,)) == pytest.approx(saving, abs=1.0 * MIB)


def test_a_step_leaves_the_model_as_it_was_and_reports_its_parts():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memory = StepMemory(model, accumulation_steps=2)
    peak = memory.measure(_batch())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # lr=0
    assert all(p.grad is None for p in model.parameters())
    weights = storage_bytes(model.parameters())
    assert peak.weights_bytes >= weights and peak.held_grads_bytes == weights
    # AdamW's two moments per element, allocated by the warm-up step before the measured one.
    assert peak.optimizer_bytes >= 2 * weights == memory.optimizer_bytes - 4 * len(list(model.parameters()))
    assert peak.persistent_bytes == (peak.weights_bytes + peak.optimizer_bytes + peak.held_grads_bytes
                                     + peak.inputs_bytes)
    assert peak.peak_bytes == peak.persistent_bytes + max(peak.phases[FORWARD_BACKWARD], peak.phases[OPTIMIZER])
    memory.release()
    assert memory.optimizer is None and memory.optimizer_bytes == 0


def test_live_bytes_counts_transients_and_frees():
    x = torch.ones(1024)
    with LiveBytes(ignore=[x]) as live:
        view = x[:10]  # a view of an existing tensor costs nothing
        y = torch.exp(x)  # 4 KiB
        z = y * 2  # 4 KiB more
        del y, z
        w = x + 1
    assert live.peak == 8192 and live.live == 4096 and view.numel() == 10 and w.numel() == 1024
