"""What a new user meets on day one: clean stdout, quiet libraries, runs that do not mix with
older ones, resume without retyping the preset, DPO on top of an SFT adapter, EMA metrics
under their own names, early checks, and the data files users already have."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from forge import cli

TINY = ["--model", "builtin:tiny-llama", "--set", "data.max_samples=16",
        "--set", "data.max_length=48", "--set", "training.per_device_train_batch_size=4",
        "--set", "training.gradient_accumulation_steps=1", "--set", "training.logging_steps=1"]


def run_forge(*args, cwd=None, env=None, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    return subprocess.run([sys.executable, "-m", "forge", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


def test_presets_show_stdout_is_only_yaml_with_wandb_offline(tmp_path):
    proc = run_forge("presets", "show", "lora", env={"WANDB_MODE": "offline"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    parsed = yaml.safe_load(proc.stdout)  # `forge presets show lora > mine.yaml` must parse
    assert isinstance(parsed, dict) and parsed["peft"]["r"] == 16
    # And the file it writes loads back as a preset.
    mine = tmp_path / "mine.yaml"
    mine.write_text(proc.stdout)
    from forge.config.loader import load_preset

    assert load_preset(str(mine)).peft_config().r == 16


def test_bitsandbytes_kernel_notice_is_silenced_by_import_forge():
    code = "import {}bitsandbytes, bitsandbytes.backends.cpu.ops"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    without = subprocess.run([sys.executable, "-c", code.format("")], capture_output=True,
                             text=True, env=env, timeout=120)
    with_forge = subprocess.run([sys.executable, "-c", code.format("forge, ")], capture_output=True,
                                text=True, env=env, timeout=120)
    assert with_forge.returncode == 0, with_forge.stderr
    assert "Failed to load CPU gemm_4bit_forward" not in with_forge.stderr
    if "Failed to load CPU gemm_4bit_forward" not in without.stderr:
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never prints the notice")


def test_deepspeed_cpu_accelerator_notice_is_silenced_by_import_forge():
    pytest.importorskip("deepspeed", reason="the notice comes from DeepSpeed")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONWARNINGS"] = "ignore"
    runs = {name: subprocess.run([sys.executable, "-c", f"import {name}deepspeed"], capture_output=True,
                                 text=True, env=env, timeout=300) for name in ("", "forge, ")}
    assert runs["forge, "].returncode == 0, runs["forge, "].stderr
    assert "Setting accelerator to CPU" not in runs["forge, "].stdout + runs["forge, "].stderr
    if "Setting accelerator to CPU" not in runs[""].stdout + runs[""].stderr:  # DeepSpeed prints it to stdout
        pytest.skip("DeepSpeed found an accelerator here, so it never prints the notice")


def test_overwrite_removes_the_previous_runs_files_but_not_the_users(tmp_path, capsys):
    out = tmp_path / "out"
    first = ["train", "demo", *TINY, "--max-steps", "2", "--output-dir", str(out),
             "--set", "monitor=true", "--set", "training.save_strategy=steps",
             "--set", "training.save_steps=1"]
    assert cli.main(first) == 0
    assert (out / "monitor_summary.json").is_file() and (out / "checkpoint-2").is_dir()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert cli.main(["train", "demo", *TINY, "--max-steps", "1", "--output-dir", str(out),
                     "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "--overwrite: removed the previous run's" in printed
    assert not (out / "monitor_summary.json").exists()  # forge report would mix it in
    assert not list(out.glob("checkpoint-*"))
    assert (out / "notes.txt").read_text() == "mine"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 1


def test_resume_without_a_preset_uses_the_runs_own(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "lora", *TINY, "--max-steps", "4", "--output-dir", str(out),
            "--set", "training.save_strategy=steps", "--set", "training.save_steps=2"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    os.chdir(tmp_path)  # where a silent demo fallback would create outputs/demo
    assert cli.main(["train", "--resume", str(out / "checkpoint-2")]) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoint-2'}" in printed
    assert "trained preset" in printed
    assert not (tmp_path / "outputs").exists()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "adapter_model.safetensors").is_file()  # the lora run, not the demo


def test_resume_without_a_preset_and_no_preset_file_is_one_clear_error(tmp_path, capsys):
    ckpt = tmp_path / "elsewhere" / "checkpoint-5"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    os.chdir(tmp_path)
    assert cli.main(["train", "--resume", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no forge_preset.yaml" in err[0] and "forge train PRESET" in err[0]
    assert not (tmp_path / "outputs").exists()


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_dpo_on_an_sft_adapter_continues_that_adapter(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from forge.demo import builtin_model_dir

    sft = tmp_path / "sft"
    assert cli.main(["train", "lora", *TINY, "--max-steps", "3", "--output-dir", str(sft),
                     "--set", "training.learning_rate=5e-2"]) == 0
    dpo = tmp_path / "dpo"
    capsys.readouterr()
    # A learning rate of ~0: the DPO result must be the SFT model, not the raw base.
    assert cli.main(["train", "dpo", "--model", str(sft), "--max-steps", "1", "--output-dir", str(dpo),
                     "--set", "data.max_samples=8", "--set", "data.max_length=48",
                     "--set", "training.per_device_train_batch_size=2",
                     "--set", "training.gradient_accumulation_steps=1",
                     "--set", "training.learning_rate=1e-12"]) == 0
    assert "is an adapter of" in capsys.readouterr().out
    ids = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 11]])

    def load(adapter):
        base = AutoModelForCausalLM.from_pretrained(builtin_model_dir())
        return PeftModel.from_pretrained(base, adapter)

    after_dpo, after_sft = _logits(load(dpo), ids), _logits(load(sft), ids)
    raw = _logits(AutoModelForCausalLM.from_pretrained(builtin_model_dir()), ids)
    assert (after_sft - raw).abs().max() > 0.05  # the SFT stage moved the model
    torch.testing.assert_close(after_dpo, after_sft, atol=1e-4, rtol=1e-4)


def test_eval_with_ema_keeps_trl_eval_metrics_apart(tmp_path):
    from forge.config.loader import load_preset
    from forge.recipes.runner import train

    preset = load_preset("demo", {
        "model.name_or_path": "builtin:tiny-llama", "data.max_samples": 24, "data.max_length": 48,
        "data.eval_fraction": 0.25, "training.max_steps": 2, "training.eval_steps": 2,
        "training.per_device_train_batch_size": 4, "training.output_dir": str(tmp_path / "o"),
        "ema": {"enabled": True, "decay": 0.5, "eval_with_ema": True},
        "training.learning_rate": 0.05,
    })
    history = train(preset).log_history
    raw = [h for h in history if "eval_loss" in h]
    ema = [h for h in history if "eval_ema_loss" in h]
    assert raw and ema
    assert "eval_mean_token_accuracy" in raw[0]
    assert "eval_ema_mean_token_accuracy" in ema[0]
    # The EMA pass's TRL figures never land under the raw names.
    assert not any(k.startswith("eval_") and not k.startswith("eval_ema_") for k in ema[0]
                   if k not in ("epoch", "step")), ema[0]


def test_ema_advice_for_a_very_short_run_says_what_to_do():
    from forge.ema.schedule import run_length_advice

    text = run_length_advice(4, 10**6, decay=0.999)
    assert "0.0000" not in text and "too few" in text
    longer = run_length_advice(200, 10**6, decay=0.999)
    assert "use decay <= 0.9750" in longer  # 1 - 5/200


def test_bad_batch_size_is_reported_before_any_model_loads(tmp_path):
    proc = run_forge("train", "lora", "--model", str(tmp_path / "no-such-model"),
                     "--set", "training.per_device_train_batch_size=0", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["forge: error: --set: training.per_device_train_batch_size: expected a value "
                     "in [1, inf), got 0"], lines


def test_max_length_is_capped_at_the_models_positions(tmp_path):
    from forge.config.loader import load_preset
    from forge.recipes.runner import build_trainer

    preset = load_preset("demo", {"data.max_length": 1024, "data.max_samples": 4,
                                  "training.output_dir": str(tmp_path / "o")})
    trainer = build_trainer(preset)
    limit = trainer.model.config.max_position_embeddings
    assert limit < 1024 and trainer.args.max_length == limit


def test_readme_snippet_works_with_instruction_data(tmp_path):
    import trl

    import forge

    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)} for i in range(8)]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preset = forge.load_preset("lora", ["training.max_steps=1", f"training.output_dir={tmp_path / 'o'}",
                                        "training.per_device_train_batch_size=4"])
    tokenizer = forge.load_tokenizer(preset.model.__class__(name_or_path="builtin:tiny-llama"))
    model = forge.load_model(preset.model.__class__(name_or_path="builtin:tiny-llama"))
    trainer = trl.SFTTrainer(model=model, args=preset.training_args(), peft_config=preset.peft_config(),
                             train_dataset=forge.load_examples(str(path), method="sft"),
                             processing_class=tokenizer)
    assert trainer.train().global_step == 1


def test_gzipped_jsonl_and_hh_rlhf_preference_rows(tmp_path):
    from forge.recipes.data import load_examples

    rows = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: good answer {i}",
             "rejected": f"\n\nHuman: question {i}?\n\nAssistant: bad answer {i}"} for i in range(3)]
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    ds = load_examples(str(path), method="dpo")
    assert ds[1]["prompt"] == [{"role": "user", "content": "question 1?"}]
    assert ds[1]["chosen"] == [{"role": "assistant", "content": "good answer 1"}]
    assert ds[1]["rejected"] == [{"role": "assistant", "content": "bad answer 1"}]
    sft = tmp_path / "sft.jsonl.gz"
    with gzip.open(sft, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "hi", "completion": "there"}) + "\n")
    assert load_examples(str(sft))[0]["completion"] == [{"role": "assistant", "content": "there"}]


def test_implicit_preference_trains_through_dpo(tmp_path):
    rows = [{"chosen": f"\n\nHuman: q{i}?\n\nAssistant: yes {i}",
             "rejected": f"\n\nHuman: q{i}?\n\nAssistant: no {i}"} for i in range(8)]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    assert cli.main(["train", "dpo", "--model", "builtin:tiny-llama", "--data", str(path),
                     "--max-steps", "1", "--output-dir", str(out), "--set", "data.max_length=32",
                     "--set", "training.per_device_train_batch_size=2",
                     "--set", "training.gradient_accumulation_steps=1"]) == 0
    assert (out / "adapter_model.safetensors").is_file()


def test_hub_dataset_names_go_through_datasets_and_fail_offline_in_one_line(monkeypatch, tmp_path):
    import datasets

    from forge.errors import ForgeError
    from forge.recipes.data import load_examples

    calls = []

    def fake_load(repo, config=None, split=None):
        calls.append((repo, config, split))
        return datasets.Dataset.from_list([{"text": "hello world"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = load_examples("someone/some-set:main", split="train")
    assert calls == [("someone/some-set", "main", "train")] and ds[0]["text"] == "hello world"
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(ForgeError, match="not a local file, and the Hub dataset could not be loaded "
                                         r"\(offline"):
        load_examples("someone/not-cached-anywhere")
    # A missing local file is still a missing file, not a Hub lookup.
    with pytest.raises(ForgeError, match="data file 'nope.jsonl' not found"):
        load_examples("nope.jsonl")


def test_each_feature_says_what_it_did_at_the_start(tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["train", "demo", *TINY, "--max-steps", "2", "--output-dir", str(out),
            "--set", "ema={enabled: true, decay: 0.9}", "--set", "monitor=true",
            "--set", "freeze={enabled: true, first: 1}", "--set", "loss={strategy: focal}",
            "--set", "training.save_strategy=steps", "--set", "training.save_steps=1"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for start in ("forge: freeze: 1 of 4 blocks frozen", "forge: loss: focal on the fused",
                  "forge: ema: averaging", "forge: monitor: watching"):
        assert start in printed, printed
    assert cli.main([*argv[:-4], "--max-steps", "3", "--resume"]) == 0
    assert f"forge: resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out
