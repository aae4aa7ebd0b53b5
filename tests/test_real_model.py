"""A real pretrained model end to end: ``forge train lora`` and ``forge train dpo`` on
SmolLM2-135M-Instruct, the output reloaded, generating, and better on held-out rows.

Opt-in (marker ``real``, a few minutes on 2 CPU cores): ``forge models fetch smollm2-135m``
once, then ``pytest -m real``; skipped when the model is not fetched. ``.ci/run`` does both.
The held-out metrics are computed here from the reloaded weights with ``F.cross_entropy`` /
``log_softmax``, not taken from the trainer's logs.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from forge import cli
from forge.errors import ForgeError

pytestmark = pytest.mark.real
MODEL = "builtin:smollm2-135m"
# Few steps, short rows: minutes on 2 CPU cores. Everything else is the shipped preset's.
SETTINGS = {"model.name_or_path": MODEL, "training.max_steps": 4, "data.max_length": 128,
            "data.eval_fraction": 0.05, "training.eval_strategy": "no",
            "training.per_device_train_batch_size": 8, "training.gradient_accumulation_steps": 1}


def cli_args(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


@pytest.fixture(scope="module")
def base_dir():
    from forge.models import model_dir

    try:
        return model_dir("smollm2-135m")
    except ForgeError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def held_out(preset: str, settings: dict):
    """The rows the run held out (``data.eval_fraction``, seeded by training.seed): forge's split."""
    import forge
    from forge.recipes.runner import load_datasets

    return load_datasets(forge.load_preset(preset, settings))[1]


def _reload(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()


@torch.no_grad()
def mean_nll(model, tokenizer, chats) -> float:
    """Token-mean negative log-likelihood of whole chats (what SFT on messages trains)."""
    total, count = 0.0, 0
    for messages in chats:
        ids = torch.tensor([tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


@torch.no_grad()
def answer_logp(model, tokenizer, prompt, answer) -> float:
    """Summed log-probability of the answer's tokens after the prompt (chat template)."""
    start = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])
    ids = torch.tensor([tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"]])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return logps[start - 1:].gather(-1, ids[0, start:, None]).sum().item()


def answer(model, tokenizer, question: str) -> str:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_lora_on_the_real_model_lowers_held_out_loss_and_still_answers(base_dir, tokenizer, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    assert cli.main(["train", "lora", *cli_args(SETTINGS), "--output-dir", str(out)]) == 0
    chats = [row["messages"] for row in held_out("lora", SETTINGS)]
    assert len(chats) >= 10
    before = mean_nll(AutoModelForCausalLM.from_pretrained(base_dir).eval(), tokenizer, chats)
    tuned = _reload(base_dir, out)
    after = mean_nll(tuned, tokenizer, chats)
    assert after < before, (before, after)
    assert "Paris" in answer(tuned, tokenizer, "What is the capital of France?")


def test_dpo_on_the_real_model_prefers_held_out_chosen_answers(base_dir, tokenizer, tmp_path, one_thread):
    out = tmp_path / "dpo"
    settings = {**SETTINGS, "data.path": "builtin:demo-dpo"}
    assert cli.main(["train", "dpo", *cli_args(settings), "--output-dir", str(out)]) == 0
    pairs = list(held_out("dpo", settings))
    assert len(pairs) >= 10
    tuned = _reload(base_dir, out)
    margins = []
    for pair in pairs:
        # DPO's implicit reward: log p - log p_ref, with the reference = the adapter switched off.
        logp = {k: answer_logp(tuned, tokenizer, pair["prompt"], pair[k]) for k in ("chosen", "rejected")}
        with tuned.disable_adapter():
            ref = {k: answer_logp(tuned, tokenizer, pair["prompt"], pair[k]) for k in ("chosen", "rejected")}
        margins.append((logp["chosen"] - ref["chosen"]) - (logp["rejected"] - ref["rejected"]))
    # Before training every margin is 0 (policy == reference): held out, it must now favour chosen.
    assert sum(margins) / len(margins) > 0 and sum(m > 0 for m in margins) > len(margins) / 2, margins
    assert "Paris" in answer(tuned, tokenizer, "What is the capital of France?")
