"""Data loading: formats detected and converted for TRL, bad rows named by number."""

from __future__ import annotations

import json

import pytest

from forge.errors import ForgeError
from forge.recipes.data import detect_format, load_examples


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_builtin_demo_sets():
    sft = load_examples("builtin:demo-sft")
    assert sft.column_names == ["messages"] and len(sft) == 400
    dpo = load_examples("builtin:demo-dpo", method="dpo")
    assert dpo.column_names == ["prompt", "chosen", "rejected"]
    assert dpo[0]["prompt"][0]["role"] == "user" and dpo[0]["chosen"][0]["role"] == "assistant"


@pytest.mark.parametrize("columns, expected", [
    (["messages"], "messages"),
    (["prompt", "completion"], "prompt_completion"),
    (["instruction", "input", "output"], "alpaca"),
    (["text", "id"], "text"),
    (["prompt", "chosen", "rejected"], "preference"),
])
def test_detect_format(columns, expected):
    assert detect_format(columns, "sft") == expected


def test_detect_format_unknown_columns():
    with pytest.raises(ForgeError, match=r"cannot tell the data format from the columns \['a', 'b'\]"):
        detect_format(["a", "b"], "sft")


def test_alpaca_becomes_chat_prompt_completion(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Greet", "input": "", "output": "Hello"},
    ])
    ds = load_examples(path)
    assert ds[0] == {"prompt": [{"role": "user", "content": "Add\n\n2 and 3"}],
                     "completion": [{"role": "assistant", "content": "5"}]}
    assert ds[1]["prompt"][0]["content"] == "Greet"


def test_other_file_types(tmp_path):
    import datasets

    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dir"))
    for name in ("d.json", "d.csv", "d.parquet", "dir"):
        ds = load_examples(str(tmp_path / name))
        assert len(ds) == 2 and ds[1]["completion"][0]["content"] == "c2", name
    assert len(load_examples(str(tmp_path / "dir"), split="test")) == 1
    with pytest.raises(ForgeError, match="no split 'validation'"):
        load_examples(str(tmp_path / "dir"), split="validation")


def test_bad_rows_are_named_by_number(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "a", "completion": "b"},
        {"prompt": "a", "completion": "b"},
        {"prompt": "a", "completion": ""},
    ])
    with pytest.raises(ForgeError, match=r"t.jsonl row 3: field 'completion' is missing or empty"):
        load_examples(path)


def test_bad_json_line_and_messages(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, '
                    '{"role": "assistant", "content": "yo"}]}\n{oops\n')
    with pytest.raises(ForgeError, match=r"m.jsonl row 2: invalid JSON"):
        load_examples(str(path))
    path = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(ForgeError, match=r"row 1: messages\[0\] has unknown role 'robot'"):
        load_examples(path)
    path = write_jsonl(tmp_path / "n.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(ForgeError, match="row 1: field 'messages' has no assistant message"):
        load_examples(path)


def test_method_and_format_must_agree(tmp_path):
    sft_rows = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ForgeError, match=r"method dpo needs prompt/chosen/rejected \(or chosen/rejected\) columns"):
        load_examples(sft_rows, method="dpo")
    dpo_rows = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(ForgeError, match="is for method dpo, not sft"):
        load_examples(dpo_rows, method="sft")
    missing = write_jsonl(tmp_path / "dm.jsonl", [{"prompt": "a", "chosen": "b", "rejected": None}])
    with pytest.raises(ForgeError, match="row 1: field 'rejected' is missing or empty"):
        load_examples(missing, method="dpo")


def test_missing_empty_and_unsupported(tmp_path):
    with pytest.raises(ForgeError, match="data file 'nope.jsonl' not found"):
        load_examples("nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ForgeError, match="the data set is empty"):
        load_examples(str(tmp_path / "e.jsonl"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ForgeError, match="unsupported data file type '.txt'"):
        load_examples(str(tmp_path / "x.txt"))
    with pytest.raises(ForgeError, match="unknown builtin data set 'builtin:nope'"):
        load_examples("builtin:nope")


def test_max_samples(tmp_path):
    assert len(load_examples("builtin:demo-sft", max_samples=7)) == 7
