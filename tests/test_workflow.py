"""After training, through the real CLI on the bundled tiny Llama: `forge merge` (LoRA, DoRA,
QLoRA both ways), `forge chat` fed from stdin, `forge generate`, and `forge eval` against an
independent computation (a plain forward + F.cross_entropy; TRL's own DPOTrainer metrics)."""

from __future__ import annotations

import io
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from forge import cli
from forge.demo import builtin_model_dir

TINY = ["--model", "builtin:tiny-llama", "--max-steps", "2", "--set", "data.max_samples=16",
        "--set", "data.max_length=64", "--set", "training.per_device_train_batch_size=4",
        "--set", "training.gradient_accumulation_steps=1", "--set", "training.learning_rate=2e-2",
        "--set", "training.logging_steps=1"]
IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 11, 64, 200]])
QUANT = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
         "bnb_4bit_compute_dtype": torch.bfloat16}


def _train(tmp_path_factory, preset: str, *extra: str) -> str:
    out = tmp_path_factory.mktemp(preset) / "run"
    assert cli.main(["train", preset, *TINY, *extra, "--output-dir", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return _train(tmp_path_factory, "lora")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    return _train(tmp_path_factory, "qlora")


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def base_model(quantized: bool = False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"quantization_config": BitsAndBytesConfig(**QUANT)} if quantized else {"dtype": torch.float32}
    return AutoModelForCausalLM.from_pretrained(builtin_model_dir(), **kwargs)


def adapter_model(run: str, quantized: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(quantized), run).eval()


@pytest.mark.parametrize("preset", ["lora", "dora"])
def test_merge_gives_a_plain_model_with_the_adapter_models_logits(preset, tmp_path, tmp_path_factory, capsys,
                                                                   lora_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = lora_run if preset == "lora" else _train(tmp_path_factory, preset)
    out = tmp_path / "merged"
    assert cli.main(["merge", run, "--out", str(out)]) == 0
    assert f"saved a plain float32 model with its tokenizer and chat template to {out}" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(merged, "peft_config")
    expected = logits(adapter_model(run))
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=1e-4)
    # The adapter changed the model, so equal logits mean the merge carried it.
    assert (logits(base_model()) - expected).abs().max() > 1e-2
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(run).chat_template
    assert "{% generation %}" in tok.chat_template


def test_merge_qlora_loads_the_base_unquantized_or_dequantizes_it(qlora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    plain, deq = tmp_path / "plain", tmp_path / "deq"
    assert cli.main(["merge", qlora_run, "--out", str(plain), "--dtype", "bfloat16"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "QLoRA run" in line]
    assert len(said) == 1 and "loaded unquantized" in said[0]
    merged = AutoModelForCausalLM.from_pretrained(plain)
    assert merged.dtype == torch.bfloat16 and getattr(merged.config, "quantization_config", None) is None
    # Full precision: the original base with the adapter on top, unmerged.
    full = logits(adapter_model(qlora_run))
    torch.testing.assert_close(logits(merged.float()), full, atol=3e-2, rtol=3e-2)  # bf16 storage

    assert cli.main(["merge", qlora_run, "--out", str(deq), "--dequantize"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "QLoRA run" in line]
    assert len(said) == 1 and "dequantized" in said[0]
    dequantized = logits(AutoModelForCausalLM.from_pretrained(deq))
    trained = logits(adapter_model(qlora_run, quantized=True))  # what training saw (bf16 compute)
    torch.testing.assert_close(dequantized, trained, atol=2e-2, rtol=2e-2)
    # ...and it is the 4-bit model, not the original one: closer to what trained than the other merge.
    assert (dequantized - trained).abs().mean() < (full - trained).abs().mean()


def test_merge_refuses_a_full_model_and_a_bad_dtype(tmp_path, capsys, tmp_path_factory, lora_run):
    assert cli.main(["merge", lora_run, "--dtype", "float8", "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip() == (
        "forge: error: --dtype: expected one of auto, float32, bfloat16, float16, got 'float8'")
    assert cli.main(["merge", str(builtin_model_dir())]) == 2
    assert "holds a full model, not an adapter" in capsys.readouterr().err


def _greedy(model, tok, messages, n):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                  return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_chat_reads_stdin_streams_answers_and_keeps_the_conversation(lora_run, monkeypatch, capsys):
    from transformers import AutoTokenizer, TextStreamer

    puts = []
    real = TextStreamer.put
    monkeypatch.setattr(TextStreamer, "put", lambda self, value: (puts.append(value.numel()), real(self, value)))
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2 plus 2?\nAnd 3 plus 4?\n/exit\nnever read\n"))
    # --base: the untrained model answers in words (the tiny trained one has learnt newlines).
    assert cli.main(["chat", lora_run, "--base", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    tok, model = AutoTokenizer.from_pretrained(lora_run), base_model()
    first = _greedy(model, tok, [{"role": "user", "content": "What is 2 plus 2?"}], 6)
    second = _greedy(model, tok, [{"role": "user", "content": "What is 2 plus 2?"},
                                  {"role": "assistant", "content": first},
                                  {"role": "user", "content": "And 3 plus 4?"}], 6)
    assert first and second
    turns = [t.strip() for t in out.split("assistant: ")[1:]]
    assert turns == [first, second]  # the second answer saw the first turn; /exit ended it
    # Streamed: the streamer got each new token as it was decoded (after the prompt, once a turn).
    assert puts.count(1) >= 2 * 5


def test_generate_batch_from_a_file_and_from_the_base(lora_run, tmp_path, capsys):
    from transformers import AutoTokenizer

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [  # of different lengths: padded batches
        {"prompt": "What is the opposite of big?", "completion": "small"},
        {"prompt": "Capital of Kenya?", "completion": "Nairobi"},
        {"prompt": "Hi", "completion": "Hello"}]) + "\n")
    out = tmp_path / "gen.jsonl"
    assert cli.main(["generate", lora_run, "--prompts", str(prompts), "--out", str(out),
                     "--max-new-tokens", "5", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["small", "Nairobi", "Hello"]
    tok = AutoTokenizer.from_pretrained(lora_run)
    trained, base = adapter_model(lora_run), base_model()
    for row in rows:  # left-padded batches answer as each prompt alone does
        assert row["model"] == "trained"
        assert row["completion"] == _greedy(trained, tok, row["prompt"], 5)
    base_out = tmp_path / "base.jsonl"
    assert cli.main(["generate", lora_run, "--prompt", "What is 2 plus 2?", "--base", "--out", str(base_out),
                     "--max-new-tokens", "5"]) == 0
    (row,) = [json.loads(line) for line in base_out.read_text().splitlines()]
    assert row["model"] == "base"
    assert row["completion"] == _greedy(base, tok, [{"role": "user", "content": "What is 2 plus 2?"}], 5)
    assert cli.main(["generate", lora_run]) == 2
    assert "give --prompt TEXT (repeatable) or --prompts FILE" in capsys.readouterr().err


def _reference_loss(model, tok, rows, max_length=64):
    """Independent: each row alone, a plain forward, F.cross_entropy summed over the targets."""
    nll, count = 0.0, 0
    for row in rows:
        if "messages" in row:
            ids = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
            start = 0
        else:
            prompt = [{"role": "user", "content": row["prompt"]}]
            full = prompt + [{"role": "assistant", "content": row["completion"]}]
            start = len(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"])
            ids = tok.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]
        ids = torch.tensor(ids[:max_length])
        labels = ids.clone()
        labels[:start] = -100
        with torch.no_grad():
            out = model(input_ids=ids[None]).logits[0].float()
        nll += F.cross_entropy(out[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
        count += int((labels[1:] != -100).sum())
    return nll / count, count


@pytest.mark.parametrize("shape", ["messages", "prompt_completion"])
def test_eval_loss_and_perplexity_match_a_plain_forward(shape, lora_run, tmp_path, capsys):
    from transformers import AutoTokenizer

    data = tmp_path / "held_out.jsonl"
    source = [json.loads(line) for line in open(_demo("demo_sft.jsonl"))][:12]
    if shape == "messages":
        rows = source
    else:  # completion-only: the prompt's tokens are no targets
        rows = [{"prompt": r["messages"][-2]["content"], "completion": r["messages"][-1]["content"]}
                for r in source]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    assert cli.main(["eval", lora_run, "--data", str(data), "--out", str(out), "--batch-size", "5"]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1].rsplit("forge:", 1)[0]) == result
    tok = AutoTokenizer.from_pretrained(lora_run)
    loss, count = _reference_loss(adapter_model(lora_run), tok, rows)
    assert result["kind"] == "lm" and result["rows"] == 12 and result["tokens"] == count
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert cli.main(["eval", lora_run, "--data", str(data), "--base", "--out", str(out)]) == 0
    base_loss, _ = _reference_loss(base_model(), tok, rows)
    assert json.loads(out.read_text())["loss"] == pytest.approx(base_loss, rel=1e-5)
    assert abs(base_loss - loss) > 1e-3  # the adapter is in the first number


def _demo(name):
    import forge.demo

    return forge.demo.HERE / name


def test_eval_preference_rewards_match_trls_dpo_trainer(lora_run, tmp_path):
    import trl
    from transformers import AutoTokenizer

    from forge.recipes.data import load_examples

    out = tmp_path / "eval.json"
    assert cli.main(["eval", lora_run, "--data", "builtin:demo-dpo", "--max-samples", "12",
                     "--beta", "0.5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "preference" and result["pairs"] == 12 and result["beta"] == 0.5
    # TRL's DPOTrainer on the same model, reference: the base the run started from (given
    # explicitly: TRL would copy a loaded adapter as the reference), one batch of 12.
    model = adapter_model(lora_run)
    args = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_eval_batch_size=12, beta=0.5,
                         max_length=64, report_to="none", use_cpu=True, bf16=False)
    trainer = trl.DPOTrainer(model=model, ref_model=base_model(), args=args, train_dataset=load_examples("builtin:demo-dpo", "dpo", max_samples=12),
                             eval_dataset=load_examples("builtin:demo-dpo", "dpo", max_samples=12),
                             processing_class=AutoTokenizer.from_pretrained(lora_run))
    metrics = trainer.evaluate()
    assert result["reward_accuracy"] == pytest.approx(metrics["eval_rewards/accuracies"], abs=1e-6)
    assert result["reward_margin"] == pytest.approx(metrics["eval_rewards/margins"], rel=1e-3, abs=1e-6)
    assert result["reward_chosen"] == pytest.approx(metrics["eval_rewards/chosen"], rel=1e-3, abs=1e-6)
    assert abs(result["reward_margin"]) > 1e-4  # the adapter moved the rewards off zero


def test_eval_lm_eval_tasks_say_what_to_install_before_loading(lora_run, monkeypatch, capsys):
    import forge.workflow.run

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    monkeypatch.setattr(forge.workflow.run, "load_trained", lambda *a, **k: pytest.fail("loaded the model"))
    assert cli.main(["eval", lora_run, "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["forge: error: --tasks runs EleutherAI's lm-evaluation-harness, which is not installed: "
                   "pip install lm-eval (or pip install 'transformers-forge[eval]')"]
    assert cli.main(["eval", lora_run]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
