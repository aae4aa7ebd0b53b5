"""Presets: every shipped YAML loads into real TRL/PEFT/transformers objects; merging and
validation behave as documented."""

from __future__ import annotations

import pytest
import yaml

import forge
from forge.config.loader import list_presets, load_preset, parse_override, presets_dir
from forge.errors import ConfigError, ForgeError

SHIPPED = ["cpt", "demo", "dora", "dpo", "kto", "lora", "orpo", "pissa", "qlora", "qlora-lean", "rslora",
           "sft", "simpo"]


def test_shipped_presets_are_listed_with_descriptions():
    presets = list_presets()
    assert sorted(presets) == SHIPPED
    assert all(presets[name] for name in SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_preset_builds_real_config_objects(name):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from forge.config.methods import config_class

    preset = load_preset(name)
    args = preset.training_args()
    assert isinstance(args, config_class(preset.method))
    assert args.output_dir.endswith(name)
    peft = preset.peft_config()
    assert (peft is None) == (name in ("sft", "demo", "cpt"))
    if peft is not None:
        assert isinstance(peft, LoraConfig)
        assert peft.target_modules == "all-linear" or "all-linear" in peft.target_modules
    quant = preset.quantization_config()
    assert (quant is not None) == (name in ("qlora", "qlora-lean"))
    if quant is not None:
        assert isinstance(quant, BitsAndBytesConfig)
        assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4"
        assert quant.bnb_4bit_use_double_quant


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_preset_opens_with_its_launch_command(name):
    text = (presets_dir() / f"{name}.yaml").read_text()
    header = text.split("\n\n")[0]
    assert header.startswith("#") and "forge train" in header


def test_extends_deep_merges_only_what_differs():
    lora, qlora = load_preset("lora"), load_preset("qlora")
    # qlora.yaml holds only the quantization block; everything else comes from lora and sft.
    assert qlora.config["peft"] == lora.config["peft"]
    assert qlora.config["training"] == lora.config["training"]
    assert qlora.config["model"]["quantization"]["bnb_4bit_quant_type"] == "nf4"
    raw = yaml.safe_load((presets_dir() / "qlora.yaml").read_text())
    assert set(raw) == {"description", "extends", "model"}
    # lora overrides one training key of sft and keeps the others.
    sft = load_preset("sft")
    assert lora.config["training"]["learning_rate"] == 2e-4
    assert sft.config["training"]["learning_rate"] == 2e-5
    assert lora.config["training"]["lr_scheduler_type"] == sft.config["training"]["lr_scheduler_type"]


def test_user_yaml_extends_shipped_by_name_and_file_by_path(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("extends: lora\npeft:\n  r: 4\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: ./base.yaml\ntraining:\n  num_train_epochs: 1\n")
    preset = load_preset(str(child))
    assert preset.config["peft"]["r"] == 4
    assert preset.config["peft"]["lora_alpha"] == 32  # from lora.yaml
    assert preset.config["training"]["num_train_epochs"] == 1
    assert preset.config["training"]["learning_rate"] == 2e-4
    assert preset.name == "child"


def test_overrides_parse_as_yaml_scalars_and_win():
    preset = load_preset("lora", ["training.learning_rate=1e-4", "training.max_steps=7",
                                  "peft.target_modules=[q_proj, v_proj]", "trackers=[tensorboard]",
                                  "model.quantization=null"])
    args = preset.get_args_dict()
    assert args["learning_rate"] == 1e-4 and isinstance(args["learning_rate"], float)
    assert args["max_steps"] == 7
    assert preset.config["peft"]["target_modules"] == ["q_proj", "v_proj"]
    assert args["report_to"] == ["tensorboard"]
    assert load_preset("lora", {"training.max_steps": 3}).get_args_dict()["max_steps"] == 3


def test_parse_override_rejects_missing_equals():
    with pytest.raises(ForgeError, match="expected KEY=VALUE"):
        parse_override("training.learning_rate")
    assert parse_override("a.b=") == ("a.b", None)
    assert parse_override("a.b=true") == ("a.b", True)


def test_unknown_keys_and_wrong_types_are_all_reported_with_file_and_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "extends: lora\n"
        "trainig: {}\n"
        "training:\n  learnig_rate: 0.1\n  num_train_epochs: many\n"
        "peft:\n  rank: 8\n"
        "model:\n  dtype: float64\n"
        "data:\n  max_lenght: 12\n"
    )
    with pytest.raises(ConfigError) as info:
        load_preset(str(bad))
    problems = info.value.problems
    text = str(info.value)
    assert len(problems) == 6, text
    assert all(p.startswith(f"{bad}: ") for p in problems), text
    assert "trainig: unknown section (did you mean 'training'?)" in text
    assert "training.learnig_rate: unknown key (did you mean 'learning_rate'?)" in text
    assert "training.num_train_epochs: expected float, got 'many'" in text
    assert "peft.rank: unknown key" in text
    assert "model.dtype: expected one of auto, float32, bfloat16, float16, got 'float64'" in text
    assert "data.max_lenght: unknown key (did you mean 'max_length'?)" in text


def test_override_errors_name_the_command_line():
    with pytest.raises(ConfigError, match=r"^--set: training.max_steps: expected int, got 'x'"):
        load_preset("sft", ["training.max_steps=x"])


def test_errors_name_the_file_that_set_the_key(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: sft\ntraining:\n  seed: abc\n")
    with pytest.raises(ConfigError) as info:
        load_preset(str(child))
    assert info.value.problems == [f"{child}: training.seed: expected int, got 'abc'"]


def test_bad_extends(tmp_path):
    missing = tmp_path / "a.yaml"
    missing.write_text("extends: lorra\n")
    with pytest.raises(ForgeError, match=r"extends: preset 'lorra' not found.*did you mean 'lora'"):
        load_preset(str(missing))
    loop_a, loop_b = tmp_path / "x.yaml", tmp_path / "y.yaml"
    loop_a.write_text("extends: ./y.yaml\n")
    loop_b.write_text("extends: ./x.yaml\n")
    with pytest.raises(ForgeError, match="extends itself"):
        load_preset(str(loop_a))
    self_ref = tmp_path / "self.yaml"
    self_ref.write_text("extends: ./self.yaml\n")
    with pytest.raises(ForgeError, match=r"extends itself \(self.yaml -> self.yaml\)"):
        load_preset(str(self_ref))
    wrong_type = tmp_path / "w.yaml"
    wrong_type.write_text("extends: [lora]\n")
    with pytest.raises(ForgeError, match="extends: expected a preset name or path"):
        load_preset(str(wrong_type))


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("training:\n  learning_rate: [1e-4\n")
    with pytest.raises(ForgeError, match=r"broken.yaml: line \d+, column \d+: invalid YAML"):
        load_preset(str(bad))
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- a\n- b\n")
    with pytest.raises(ForgeError, match="must be a YAML mapping"):
        load_preset(str(not_mapping))


def test_contradictions_are_errors():
    with pytest.raises(ConfigError, match="cannot be fully fine-tuned"):
        load_preset("qlora", ["peft=null"])
    with pytest.raises(ConfigError, match="packing applies to sft only"):
        load_preset("dpo", ["data.packing=true"])
    with pytest.raises(ConfigError, match="training.max_length: set data.max_length instead"):
        load_preset("sft", ["training.max_length=10"])
    with pytest.raises(ConfigError, match="model.quantization.load_in_4bits: unknown key"):
        load_preset("qlora", ["model.quantization.load_in_4bits=true"])


def test_dpo_keys_are_checked_against_dpo_config():
    assert load_preset("dpo").training_args().beta == 0.1
    with pytest.raises(ConfigError, match="training.beta: unknown key"):
        load_preset("sft", ["training.beta=0.2"])


def test_to_yaml_is_fully_resolved_and_loads_back(tmp_path):
    preset = load_preset("qlora", ["training.max_steps=5"])
    text = preset.to_yaml()
    assert "extends" not in yaml.safe_load(text)
    out = tmp_path / "resolved.yaml"
    out.write_text(text)
    again = load_preset(str(out))
    assert again.config == preset.to_dict() | {"description": preset.config["description"]}
    assert again.get_args_dict() == preset.get_args_dict() | {"output_dir": "outputs/resolved"}


def test_get_args_dict_is_plain_and_maps_data_and_trackers():
    args = load_preset("lora", ["trackers=[wandb, mlflow]", "data.max_length=64"]).get_args_dict()
    assert args["max_length"] == 64 and args["packing"] is False
    assert args["report_to"] == ["wandb", "mlflow"]
    assert load_preset("sft").get_args_dict()["report_to"] == "none"
    assert all(isinstance(v, (str, int, float, bool, list, type(None))) for v in args.values())


def test_top_level_api_is_exported():
    assert forge.load_preset is load_preset
    from forge.recipes import runner

    assert forge.train is runner.train and callable(forge.list_presets)
    assert forge.EMACallback.__name__ == "EMACallback"
    with pytest.raises(AttributeError):
        forge.no_such_name
