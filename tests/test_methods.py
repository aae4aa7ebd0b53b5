"""The methods and presets beyond SFT/LoRA/QLoRA/DPO, each trained a few steps through the real CLI
on the bundled tiny Llama: orpo, simpo (CPO), kto, cpt, dora, rslora, pissa, qlora-lean."""

from __future__ import annotations

import json

import pytest
import torch

from forge import cli
from forge.config.loader import load_preset
from forge.config.methods import METHOD_TABLE, config_class, trainer_class
from forge.demo import builtin_model_dir

TINY = ["--model", "builtin:tiny-llama", "--max-steps", "2", "--set", "data.max_samples=8",
        "--set", "data.max_length=48", "--set", "training.per_device_train_batch_size=4",
        "--set", "training.gradient_accumulation_steps=1", "--set", "training.logging_steps=1"]
NEW = ["orpo", "simpo", "kto", "cpt", "dora", "rslora", "pissa", "qlora-lean"]
# The new methods train beside forge's callbacks too: EMA and the gradient monitor.
WITH_FEATURES = ["--set", "ema={enabled: true, decay: 0.5}", "--set", "monitor={enabled: true, log_every: 1}"]


def assert_features_reported(result):
    logged = [h for h in result.log_history if "loss" in h]
    assert logged and all("forge/ema/decay" in h for h in logged)
    assert all(h["forge/grad_norm_preclip"] > 0 and h["forge/skipped_steps"] == 0 for h in logged)


@pytest.fixture
def train_cli(monkeypatch, tmp_path):
    """`forge train` through cli.main in this process; hands back the TrainResult."""
    import forge.recipes.runner

    results = []
    real = forge.recipes.runner.train
    monkeypatch.setattr(forge.recipes.runner, "train", lambda *a, **k: results.append(real(*a, **k)) or results[-1])

    def run(preset, *extra, name=None):
        out = tmp_path / (name or preset)
        assert cli.main(["train", preset, *TINY, *extra, "--output-dir", str(out)]) == 0
        return results[-1]

    return run


@pytest.mark.parametrize("name", NEW)
def test_new_presets_build_the_real_trl_and_peft_configs(name):
    preset = load_preset(name)
    assert isinstance(preset.training_args(), config_class(preset.method))
    lora = preset.peft_config()
    assert (lora is None) == (name == "cpt")  # continued pre-training is a full fine-tune
    expected = {"dora": ("use_dora", True), "rslora": ("use_rslora", True),
                "pissa": ("init_lora_weights", "pissa")}
    if name in expected:
        key, value = expected[name]
        assert getattr(lora, key) == value
    if name == "cpt":
        assert preset.training_args().packing and preset.data.format == "text"


def test_experimental_trainers_come_from_trl_experimental_and_are_said_so(train_cli, capsys):
    assert trainer_class("orpo").__module__.startswith("trl.experimental.orpo")
    assert trainer_class("cpo").__module__.startswith("trl.experimental.cpo")
    assert trainer_class("kto").__module__.startswith("trl.trainer")  # promoted to the stable API
    result = train_cli("orpo", *WITH_FEATURES)
    assert type(result.trainer).__name__ == "ORPOTrainer"
    assert_features_reported(result)
    out = capsys.readouterr().out
    assert out.count("forge: method orpo: TRL's ORPOTrainer from trl.experimental.orpo") == 1
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert json.loads(open(f"{result.output_dir}/adapter_config.json").read())["r"] == 16


def test_simpo_is_cpo_with_the_simpo_loss_and_no_bc_term(train_cli):
    result = train_cli("simpo", *WITH_FEATURES)
    assert type(result.trainer).__name__ == "CPOTrainer"
    assert_features_reported(result)
    args = result.trainer.args
    assert args.loss_type == "simpo" and args.cpo_alpha == 0.0 and args.beta == 2.0
    assert [h for h in result.log_history if "loss" in h]


def test_kto_trains_on_unpaired_rows_and_on_pairs_made_unpaired(train_cli, tmp_path):
    data = tmp_path / "thumbs.jsonl"
    rows = [{"prompt": f"What is {i} plus 1?", "completion": f"{i} plus 1 is {i + (1 if i % 3 else 2)}.",
             "label": bool(i % 3)} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = train_cli("kto", "--data", str(data), *WITH_FEATURES)
    assert type(result.trainer).__name__ == "KTOTrainer"
    assert_features_reported(result)
    assert sorted(result.trainer.train_dataset["label"]) == sorted(r["label"] for r in rows[:8])
    from forge.recipes.data import load_examples

    paired = load_examples("builtin:demo-dpo", "kto", max_samples=8)  # what the kto preset reads
    assert sorted(paired["label"]) == [False] * 8 + [True] * 8
    pairs = load_examples("builtin:demo-dpo", "dpo", max_samples=8)
    good = {(r["prompt"][0]["content"], r["completion"][0]["content"]) for r in paired if r["label"]}
    assert good == {(r["prompt"][0]["content"], r["chosen"][0]["content"]) for r in pairs}


def test_cpt_packs_raw_text_and_splits_long_documents_without_losing_tokens(train_cli):
    result = train_cli("cpt", *WITH_FEATURES, "--set", "loss={strategy: focal}")  # packed + fused loss
    assert_features_reported(result)
    trainer = result.trainer
    assert trainer.padding_free and trainer.args.packing_strategy == "bfd_split"
    tok = trainer.processing_class
    docs = [json.loads(line)["text"] for line in open(_demo("demo_text.jsonl"))][:8]
    tokens = sum(len(tok(d + tok.eos_token)["input_ids"]) for d in docs)
    packed = trainer.train_dataset
    assert sum(map(len, packed["input_ids"])) == tokens  # nothing truncated
    assert max(len(d) for d in packed["input_ids"]) <= 48 < max(len(tok(d)["input_ids"]) for d in docs)
    for ids, labels in zip(packed["input_ids"], packed["labels"]):
        assert labels == ids  # raw text: every token is a target


def _demo(name):
    import forge.demo

    return forge.demo.HERE / name


def test_rslora_scales_by_alpha_over_sqrt_r(train_cli):
    result = train_cli("rslora")
    layer = result.trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.r["default"] == 64 and layer.scaling["default"] == pytest.approx(16 / 64 ** 0.5)


def test_qlora_lean_uses_paged_8bit_adamw_and_checkpointing(train_cli):
    import bitsandbytes as bnb

    result = train_cli("qlora-lean")
    trainer = result.trainer
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    # transformers builds paged_adamw_8bit as bitsandbytes' AdamW(optim_bits=8, is_paged=True).
    assert isinstance(optimizer, bnb.optim.AdamW) and optimizer.is_paged and optimizer.args.optim_bits == 8
    assert trainer.args.gradient_checkpointing and trainer.model.is_activation_checkpointing
    assert trainer.args.per_device_train_batch_size == 4  # TINY's --set wins over the preset's 1
    assert load_preset("qlora-lean").config["training"]["per_device_train_batch_size"] == 1


def test_pissa_is_saved_as_a_plain_lora_adapter_of_the_original_base(train_cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train_cli("pissa", "--set", "training.learning_rate=1e-2")
    config = json.loads(open(f"{result.output_dir}/adapter_config.json").read())
    assert config["r"] == 32 and config["init_lora_weights"] is True  # PEFT's conversion: rank 2r
    ids = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 11]])
    trained = result.trainer.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(builtin_model_dir(), dtype=torch.float32)
        untouched = base(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(base, result.output_dir).eval()
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (untouched - expected).abs().max() > 1e-3  # training moved it: the match is the adapter


@pytest.mark.parametrize("method, argv, message", [
    ("orpo", ["--set", "freeze.enabled=true", "--set", "freeze.first=1"],
     "freeze: freezing blocks is not supported with orpo yet"),
    ("kto", ["--set", "loss.strategy=focal"], "loss: the token-level loss applies to sft only; kto has its own"),
    ("simpo", ["--set", "data.packing=true"], "data.packing: packing applies to sft only; set it to false for cpo"),
])
def test_what_a_method_refuses_is_one_error_line(method, argv, message, tmp_path, capsys):
    assert cli.main(["train", method, *argv, "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("forge: error: ")


def test_every_method_has_a_trainer_and_refuses_nothing_for_sft():
    for name, method in METHOD_TABLE.items():
        assert trainer_class(name).__name__.endswith("Trainer")
        assert config_class(name).__name__.endswith("Config")
    assert METHOD_TABLE["sft"].refuses == {}


def test_preference_data_is_refused_by_sft_and_chats_by_preference_methods(tmp_path, capsys):
    assert cli.main(["train", "lora", "--data", "builtin:demo-dpo", "--output-dir", str(tmp_path / "a")]) == 2
    assert "chosen/rejected data is for method dpo, not sft (or orpo, cpo, kto)" in capsys.readouterr().err
    assert cli.main(["train", "orpo", "--data", "builtin:demo-sft", "--output-dir", str(tmp_path / "b")]) == 2
    assert "method orpo needs prompt/chosen/rejected (or chosen/rejected) columns" in capsys.readouterr().err
