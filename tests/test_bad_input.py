"""The bad-input corpus: every mistake a user can make in a preset, a data file or the
command line gives one `forge: error:` line naming the problem, exit code 2, no traceback,
and leaves the user's files as they were."""

from __future__ import annotations

import json
import sys

import pytest

from forge import cli

SFT_ROW = {"prompt": "What is 2 plus 2?", "completion": "4."}


def jsonl(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


# (case id, files to create {name: text}, argv after `forge`, expected message fragment)
CASES = [
    ("malformed-yaml", {"p.yaml": "training:\n  seed: [1\n"}, ["train", "p.yaml"], "p.yaml: line"),
    ("yaml-not-mapping", {"p.yaml": "- 1\n"}, ["train", "p.yaml"], "must be a YAML mapping"),
    ("unknown-section", {"p.yaml": "trainer: {}\n"}, ["train", "p.yaml"],
     "trainer: unknown section (did you mean 'training'?)"),
    ("unknown-training-key", {"p.yaml": "extends: lora\ntraining:\n  lerning_rate: 1\n"},
     ["train", "p.yaml"], "training.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
    ("mistyped-value", {"p.yaml": "training:\n  max_steps: ten\n"}, ["train", "p.yaml"],
     "training.max_steps: expected int, got 'ten'"),
    ("bool-for-string", {"p.yaml": "model:\n  name_or_path: true\n"}, ["train", "p.yaml"],
     "model.name_or_path: expected str, got True"),
    ("extends-itself", {"p.yaml": "extends: ./p.yaml\n"}, ["train", "p.yaml"], "extends itself"),
    ("extends-missing", {"p.yaml": "extends: qlorra\n"}, ["train", "p.yaml"],
     "preset 'qlorra' not found"),
    ("extends-wrong-type", {"p.yaml": "extends: 3\n"}, ["train", "p.yaml"],
     "extends: expected a preset name or path"),
    ("unknown-preset", {}, ["train", "lorra"], "preset 'lorra' not found"),
    ("missing-preset-file", {}, ["train", "nope.yaml"], "preset 'nope.yaml' not found"),
    ("unknown-method", {}, ["train", "sft", "--set", "method=ppo"],
     "method: expected one of sft, dpo, orpo, cpo, kto, got 'ppo'"),
    ("bad-format-name", {}, ["train", "sft", "--set", "data.format=chatml"],
     "data.format: expected one of"),
    ("eval-fraction-range", {}, ["train", "sft", "--set", "data.eval_fraction=1.5"],
     "data.eval_fraction: expected a fraction between 0 and 1"),
    ("unknown-tracker", {}, ["train", "sft", "--set", "trackers=[tensorbord]"],
     "unknown tracker 'tensorbord'"),
    ("qlora-full-finetune", {}, ["train", "qlora", "--set", "peft=null"], "cannot be fully fine-tuned"),
    ("dpo-token-loss", {}, ["train", "dpo", "--set", "loss={strategy: focal}"],
     "the token-level loss applies to sft only"),
    ("dpo-freeze", {}, ["train", "dpo", "--set", "freeze={enabled: true, first: 1}"],
     "freezing blocks is not supported with dpo yet"),
    ("dpo-packing", {}, ["train", "dpo", "--set", "data.packing=true"], "packing applies to sft only"),
    ("moved-key", {}, ["train", "sft", "--set", "training.packing=true"],
     "training.packing: set data.packing instead"),
    ("quantization-key", {}, ["train", "qlora", "--set", "model.quantization.bits=4"],
     "model.quantization.bits: unknown key"),
    ("set-without-equals", {}, ["train", "sft", "--set", "training.seed"], "expected KEY=VALUE"),
    ("set-bad-yaml", {}, ["train", "sft", "--set", "training.seed=[1"], "the value is not valid YAML"),
    ("args-contradiction", {}, ["train", "sft", "--model", "builtin:tiny-llama",
                                "--set", "training.load_best_model_at_end=true",
                                "--set", "training.save_strategy=steps"], "training:"),
    ("missing-data", {}, ["train", "sft", "--data", "none.jsonl"], "data file 'none.jsonl' not found"),
    ("empty-data", {"d.jsonl": "\n"}, ["train", "sft", "--data", "d.jsonl"], "the data set is empty"),
    ("row-missing-field", {"d.jsonl": jsonl(SFT_ROW, {"prompt": "x"})},
     ["train", "sft", "--data", "d.jsonl"], "d.jsonl row 2: field 'completion' is missing or empty"),
    ("row-empty-field", {"d.jsonl": jsonl(SFT_ROW, SFT_ROW, {"prompt": "", "completion": "y"})},
     ["train", "sft", "--data", "d.jsonl"], "d.jsonl row 3: field 'prompt' is missing or empty"),
    ("row-not-text", {"d.jsonl": jsonl({"prompt": 3, "completion": "y"})},
     ["train", "sft", "--data", "d.jsonl"], "row 1: field 'prompt' must be text"),
    ("invalid-json-line", {"d.jsonl": jsonl(SFT_ROW) + "{broken\n"},
     ["train", "sft", "--data", "d.jsonl"], "d.jsonl row 2: invalid JSON"),
    ("bad-role", {"d.jsonl": jsonl({"messages": [{"role": "bot", "content": "x"}]})},
     ["train", "sft", "--data", "d.jsonl"], "row 1: messages[0] has unknown role 'bot'"),
    ("no-assistant", {"d.jsonl": jsonl({"messages": [{"role": "user", "content": "x"}]})},
     ["train", "sft", "--data", "d.jsonl"], "no assistant message"),
    ("unknown-columns", {"d.jsonl": jsonl({"question": "a", "answer": "b"})},
     ["train", "sft", "--data", "d.jsonl"], "cannot tell the data format"),
    ("wrong-dpo-columns", {"d.jsonl": jsonl(SFT_ROW)}, ["train", "dpo", "--data", "d.jsonl"],
     "method dpo needs prompt/chosen/rejected (or chosen/rejected) columns"),
    ("dpo-missing-rejected", {"d.jsonl": jsonl({"prompt": "p", "chosen": "c", "rejected": ""})},
     ["train", "dpo", "--data", "d.jsonl"], "row 1: field 'rejected' is missing or empty"),
    ("preference-data-for-sft", {"d.jsonl": jsonl({"prompt": "p", "chosen": "c", "rejected": "r"})},
     ["train", "sft", "--data", "d.jsonl"], "is for method dpo, not sft"),
    ("unsupported-extension", {"d.txt": "hello"}, ["train", "sft", "--data", "d.txt"],
     "unsupported data file type '.txt'"),
    ("not-a-saved-dataset", {"dir/readme.md": "x"}, ["train", "sft", "--data", "dir"],
     "not a directory saved by datasets"),
    ("unknown-builtin-data", {}, ["train", "sft", "--data", "builtin:demo"],
     "unknown builtin data set 'builtin:demo'"),
    ("missing-model-path", {}, ["train", "sft", "--model", "./models/none"],
     "model path './models/none' does not exist"),
    ("unknown-builtin-model", {}, ["train", "sft", "--model", "builtin:huge-llama"],
     "unknown builtin model 'builtin:huge-llama'"),
    ("output-dir-is-file", {"o": "x"}, ["train", "demo", "--output-dir", "o"], "is a file"),
    ("output-dir-not-empty", {"o/keep.txt": "mine"}, ["train", "demo", "--output-dir", "o"],
     "exists and is not empty"),
    ("resume-without-checkpoint", {}, ["train", "demo", "--resume", "--max-steps", "1"],
     "--resume: no complete checkpoint-* directory"),
]


@pytest.mark.parametrize("files, argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_lost(files, argv, message, tmp_path,
                                                       monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    if "--output-dir" not in argv:
        argv = [*argv, "--output-dir", "out"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("forge: error: ") for line in err), err
    assert any(message in line for line in err), err
    assert "Traceback" not in "\n".join(err)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing of the user's changed, and nothing new written


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


def test_quantization_without_bitsandbytes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an absent package looks like
    argv = ["train", "qlora", "--model", "builtin:tiny-llama", "--output-dir", "out"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "forge: error: model.quantization needs bitsandbytes: pip install bitsandbytes")
    assert not (tmp_path / "out").exists()
