"""Safe loading: no pickle without weights_only, no unsafe YAML, no code from presets,
trust_remote_code off unless the user turns it on, weights written as safetensors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from forge.config import ModelConfig
from forge.config.loader import load_preset
from forge.errors import ForgeError

ROOT = Path(__file__).parent.parent
SOURCES = sorted([*ROOT.glob("forge/**/*.py"), *ROOT.glob("examples/*.py"),
                  *ROOT.glob("benchmarks/*.py")])


def calls(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_sources_were_found():
    assert len(SOURCES) > 20


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_deserialisation(path):
    for node, name in calls(path):
        where = f"{path.relative_to(ROOT)}:{node.lineno}"
        if name == "torch.load":
            kw = {k.arg: k.value for k in node.keywords}
            assert "weights_only" in kw and ast.literal_eval(kw["weights_only"]) is True, where
        assert name not in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "pickle.load",
                            "pickle.loads", "eval", "exec", "torch.serialization.load"), where


def test_a_preset_cannot_construct_python_objects(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("training: !!python/object/apply:os.system ['echo pwned > pwned.txt']\n")
    with pytest.raises(ForgeError, match="invalid YAML"):
        load_preset(str(evil))
    assert not (tmp_path / "pwned.txt").exists()


def test_trust_remote_code_is_off_unless_asked():
    assert ModelConfig().trust_remote_code is False
    for name in ("sft", "lora", "qlora", "dpo", "demo"):
        assert load_preset(name).model.trust_remote_code is False
    assert load_preset("lora", ["model.trust_remote_code=true"]).model.trust_remote_code is True
