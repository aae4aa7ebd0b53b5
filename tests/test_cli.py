"""The `forge` CLI end to end on tiny models: every preset trains and its output reloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from forge import cli
from forge.demo import builtin_model_dir

FAST = ["--model", "builtin:tiny-llama", "--max-steps", "3",
        "--set", "data.max_samples=24", "--set", "data.max_length=64",
        "--set", "training.per_device_train_batch_size=4",
        "--set", "training.gradient_accumulation_steps=2",
        "--set", "training.logging_steps=1", "--set", "training.learning_rate=1e-2"]


def run_forge(*args, cwd=None, timeout=300):
    """Run the real console entry point in a fresh process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "forge", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture
def train_in_process(monkeypatch):
    """Run `forge train` through cli.main in this process and hand back the TrainResult."""
    import forge.recipes.runner

    results = []
    real_train = forge.recipes.runner.train

    def capture(*args, **kwargs):
        results.append(real_train(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(forge.recipes.runner, "train", capture)

    def run(argv):
        assert cli.main(argv) == 0
        return results[-1]

    return run


def logits_of(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


@pytest.mark.parametrize("preset", ["sft", "lora", "qlora", "dpo"])
def test_preset_trains_and_saved_output_reloads_with_same_logits(preset, tmp_path, train_in_process):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = tmp_path / "out"
    result = train_in_process(["train", preset, *FAST, "--output-dir", str(out)])
    assert result.trainer.state.global_step == 3
    assert (out / "forge_preset.yaml").is_file() and (out / "trainer_state.json").is_file()
    assert (out / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 11]])
    trained = logits_of(result.trainer.model, ids)

    base_kwargs = {}
    if preset == "qlora":
        base_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if preset == "sft":
        assert (out / "model.safetensors").is_file()
        reloaded = AutoModelForCausalLM.from_pretrained(out)
    else:
        assert (out / "adapter_model.safetensors").is_file()
        assert not (out / "model.safetensors").exists()
        base = AutoModelForCausalLM.from_pretrained(builtin_model_dir(), **base_kwargs)
        reloaded = PeftModel.from_pretrained(base, out)
    trained_params = dict(result.trainer.model.named_parameters())
    for name, param in reloaded.named_parameters():
        if param.dtype == torch.uint8:
            continue  # packed 4-bit: bitsandbytes repacks it for its CPU kernel on first use
        assert torch.equal(param.data, trained_params[name].data), name
    # 4-bit matmuls run in bf16, and bitsandbytes picks another kernel once the inputs
    # require grad (as in the trainer's model): equal weights, bf16-close logits.
    tol = 5e-3 if preset == "qlora" else 1e-5
    torch.testing.assert_close(logits_of(reloaded, ids), trained, atol=tol, rtol=tol)
    # And training changed something, so the comparison above means something.
    untouched = AutoModelForCausalLM.from_pretrained(builtin_model_dir(), **base_kwargs)
    assert not torch.allclose(logits_of(untouched, ids), trained, atol=1e-4)


def test_demo_runs_offline_with_no_arguments_and_loss_goes_down(tmp_path):
    proc = run_forge("train", cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "outputs" / "demo"
    assert (out / "model.safetensors").is_file()
    assert "forge: model, tokenizer and forge_preset.yaml saved in outputs/demo" in proc.stdout
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
              if "loss" in h]
    assert len(losses) >= 10
    assert losses[-1] < 0.5 * losses[0], losses


def test_presets_list_and_show(capsys):
    assert cli.main(["presets", "list"]) == 0
    listed = capsys.readouterr().out
    for name in ("sft", "lora", "qlora", "dpo", "demo"):
        assert f"\n{name} " in "\n" + listed
    assert cli.main(["presets", "show", "qlora", "--set", "training.max_steps=9"]) == 0
    shown = capsys.readouterr().out
    assert "bnb_4bit_quant_type: nf4" in shown and "max_steps: 9" in shown


@pytest.mark.parametrize("argv, message", [
    (["train", "nosuch"], "preset 'nosuch' not found"),
    (["train", "lora", "--set", "training.learnig_rate=1"], "--set: training.learnig_rate: unknown key (did you mean 'learning_rate'?)"),
    (["train", "lora", "--data", "missing.jsonl"], "data file 'missing.jsonl' not found"),
    (["train", "lora", "--model", "./no/such/model"], "model path './no/such/model' does not exist"),
    (["train", "lora", "--set", "oops"], "expected KEY=VALUE"),
])
def test_user_errors_print_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert cli.main([*argv, "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"forge: error: {message}"] or any(message in line for line in err), err
    assert all(line.startswith("forge: error: ") for line in err)


def test_bad_data_row_from_the_real_cli(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    proc = run_forge("train", "lora", "--data", str(data), "--output-dir", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"forge: error: {data} row 2: field 'completion' is missing or empty")
    assert "Traceback" not in proc.stderr


def test_existing_output_dir_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert cli.main(["train", "demo", "--output-dir", str(out)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
