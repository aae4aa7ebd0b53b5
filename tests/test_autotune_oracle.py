"""forge.autotune judged by an independent oracle: the peak RSS growth of a fresh process that
trains (and evaluates) the same model at the chosen batch, never the estimator itself.

"Within 90% of the true largest batch, never above it" is checked with two fresh processes per
choice: the chosen batch ``b`` must fit the budget and ``floor(b / 0.9) + 1`` must not (memory
grows with the batch, so the true largest lies in ``[b, b / 0.9]``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _memory_oracle import available as oracle_available
from _memory_oracle import rss_growth
from transformers import LlamaConfig, LlamaForCausalLM

import forge
from forge.autotune import autotune_batch_size
from forge.recipes import autotune_preset

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not oracle_available(), reason="needs Linux /proc to reset peak RSS")]

MB = 10**6


def _above(batch: int) -> int:
    """The smallest batch that must not fit when ``batch`` is within 90% of the largest that does."""
    return math.floor(batch / 0.9) + 1


# -- a bare model: training and evaluation batches ------------------------------------------------
# The model: vocabulary 8192 over hidden 64, where backward transients of the logits
# are half the peak (a sum of categories chose twice the batch that fits).
CONFIG = {"vocab_size": 8192, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2}
SEQ, BUDGET = 32, 160 * MB


def test_bare_model_train_and_eval_batches_are_the_fresh_process_maxima():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    result = autotune_batch_size(model, max_memory=BUDGET, seq_len=SEQ, tune_eval=True, max_eval_batch=512)
    train, evaluate = result.per_device_train_batch_size, result.per_device_eval_batch_size
    assert len(result.probes) <= 5 and len(result.eval_probes) <= 5
    spec = {"config": CONFIG, "seq": SEQ}
    fits, over = rss_growth([{**spec, "batch": train, "eval_batch": evaluate},
                             {**spec, "batch": _above(train), "eval_batch": _above(evaluate)}], key=None)
    numbers = (train, evaluate, fits, over)
    assert fits["growth"] <= BUDGET < over["growth"], numbers
    # Evaluation runs mid-training, beside the optimizer state: the same budget holds for both.
    assert fits["eval_growth"] <= BUDGET < over["eval_growth"], numbers


# -- a preset: freeze and EMA on, through autotune_preset and forge train -------------------------
def _wide_model(root) -> str:
    """The demo's tokenizer on a wider Llama (12M parameters), so that weights, optimizer state
    and the EMA shadow are a large share of the budget: forgetting one of them shows."""
    import shutil

    from forge.demo import builtin_model_dir

    src, path = builtin_model_dir("tiny-llama"), root / "wide-llama"
    config = LlamaConfig.from_pretrained(src)
    config.hidden_size, config.intermediate_size, config.head_dim = 512, 1376, 64
    config.num_attention_heads, config.num_key_value_heads = 8, 4
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, path / name)
    return str(path)


BUDGET_PRESET = 250 * MB
FEATURES = {
    "freeze.enabled": True, "freeze.ratio": 0.5, "freeze.embeddings": True,  # blocks 0-1 and embeddings
    "ema.enabled": True,
    "autotune.enabled": True, "autotune.max_memory": "250MB",
    # Without activation checkpointing the frozen blocks save no activations either.
    "training.gradient_checkpointing": False,
}


def test_preset_with_freeze_and_ema_picks_the_batch_the_trained_model_allows(tmp_path):
    features = {**FEATURES, "model.name_or_path": _wide_model(tmp_path)}
    # The memory limit, with a target that many batches divide.
    limit = autotune_preset(forge.load_preset("demo", features), target_global_batch=5040).max_per_device
    preset = {**features, "autotune.target_global_batch": 2 * limit}
    result = autotune_preset(forge.load_preset("demo", preset))
    batch, steps = result.per_device_train_batch_size, result.gradient_accumulation_steps
    assert (batch, steps) == (limit, 2)
    ema_shadow = 4 * sum(p.numel() for n, p in LlamaForCausalLM.from_pretrained(preset["model.name_or_path"])
                         .named_parameters() if ".layers.2." in n or ".layers.3." in n or n == "model.norm.weight")
    assert result.reserved == ema_shadow  # the EMA shadow of what trains after freezing, budgeted

    # `forge train` makes the same choice in its phase 2, on the same transformed model.
    from forge.cli import main

    out = tmp_path / "run"
    run = {**preset, "training.max_steps": 1, "training.logging_steps": 1, "training.output_dir": str(out)}
    assert main(["train", "demo"] + [a for k, v in run.items() for a in ("--set", f"{k}={json.dumps(v)}")]) == 0
    logged = next(e for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
                  if "forge/autotune/per_device_train_batch_size" in e)
    assert (logged["forge/autotune/per_device_train_batch_size"],
            logged["forge/autotune/gradient_accumulation_steps"]) == (batch, steps)

    # The oracle trains the same transformed model (freeze applied, EMA shadow held and updated)
    # with the Trainer's optimizer and clipping, at the chosen batch and accumulation.
    spec = {"preset": "demo", "overrides": preset, "ema": True, "seq": result.seq_len, "accumulation": steps,
            "max_grad_norm": 1.0}
    fits, over = rss_growth([{**spec, "batch": batch}, {**spec, "batch": _above(batch)}])
    assert fits <= BUDGET_PRESET < over, (batch, fits, over)
