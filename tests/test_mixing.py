"""`data.sources`: several sources mixed by weight (datasets' interleave_datasets, seeded by
training.seed), each with its own format, split, max_samples and column map; the single-source
form unchanged; problems named by source index before anything loads."""

from __future__ import annotations

import csv
import json

import pytest

import forge
from forge import cli
from forge.errors import ConfigError, ForgeError
from forge.recipes.data import load_examples
from forge.recipes.mixing import load_datasets


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def two_files(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": f"A{i}"} for i in range(300)])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": f"B{i}"} for i in range(300)])
    return a, b


def _mixed(sources, seed=42, **data):
    preset = forge.load_preset("lora", {"data.sources": sources, "training.seed": seed,
                                        **{f"data.{k}": v for k, v in data.items()}})
    return load_datasets(preset.data, preset.method, seed)


def _origin(ds):
    return [row["prompt"][0]["content"][0] for row in ds]


def test_sources_mix_by_weight_with_a_seeded_order(two_files, capsys):
    a, b = two_files
    train, _ = _mixed([{"path": a, "weight": 3}, {"path": b, "weight": 1}])
    origin = _origin(train)
    # first_exhausted stops when `a` (drawn 3 times as often) runs out: all 300 of a, ~100 of b.
    assert origin.count("a") == 300 and 70 < origin.count("b") < 130
    assert f"{len(origin)} rows, 300 from {a}, {origin.count('b')} from {b}" in capsys.readouterr().out
    again, _ = _mixed([{"path": a, "weight": 3}, {"path": b, "weight": 1}])
    assert _origin(again) == origin  # seeded by training.seed
    other, _ = _mixed([{"path": a, "weight": 3}, {"path": b, "weight": 1}], seed=7)
    assert _origin(other) != origin
    everything, _ = _mixed([{"path": a, "weight": 3}, {"path": b, "weight": 1}],
                           stopping_strategy="all_exhausted_without_replacement")
    assert sorted(_origin(everything)) == ["a"] * 300 + ["b"] * 300


def test_one_source_in_a_list_reads_what_the_single_form_reads(two_files):
    a, _ = two_files
    listed, _ = _mixed([{"path": a, "max_samples": 20}])
    preset = forge.load_preset("lora", {"data.path": a, "data.max_samples": 20})
    single, _ = load_datasets(preset.data, preset.method, 42)
    assert listed.to_list() == single.to_list() == load_examples(a, max_samples=20).to_list()


def test_each_source_has_its_own_format_split_max_samples_and_columns(tmp_path):
    qa = tmp_path / "qa.csv"
    with open(qa, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer"])
        writer.writerows([[f"q{i}", f"ans{i}"] for i in range(10)])
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "x"}]),
                          "chat": datasets.Dataset.from_list(
                              [{"messages": [{"role": "user", "content": f"m{i}"},
                                             {"role": "assistant", "content": f"r{i}"}]} for i in range(10)])}
                         ).save_to_disk(str(saved))
    train, _ = _mixed([
        {"path": str(qa), "columns": {"question": "prompt", "answer": "completion"}, "max_samples": 4},
        {"path": str(saved), "split": "chat", "max_samples": 4, "weight": 1.0},
    ], stopping_strategy="all_exhausted_without_replacement")
    # prompt/completion rows join chat rows as messages: the prompt turn, then the answer.
    assert train.column_names == ["messages"]
    texts = sorted(m[0]["content"] + "/" + m[1]["content"] for m in train["messages"])
    assert texts == sorted([f"q{i}/ans{i}" for i in range(4)] + [f"m{i}/r{i}" for i in range(4)])


def test_a_column_map_renames_before_the_format_is_detected(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}])
    preset = forge.load_preset("lora", {"data.path": path, "data.columns": {"question": "prompt",
                                                                           "answer": "completion"}})
    train, _ = load_datasets(preset.data, preset.method, 42)
    assert train[0] == {"prompt": [{"role": "user", "content": "2+2?"}],
                        "completion": [{"role": "assistant", "content": "4"}]}
    with pytest.raises(ForgeError, match=r"qa.jsonl: columns: no column 'query' to rename to 'prompt' "
                                         r"\(has answer, question\)"):
        load_examples(path, columns={"query": "prompt"})


def test_bad_sources_are_named_by_index_before_anything_loads(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError) as err:
        forge.load_preset("lora", {"data.sources": [
            {"path": "a.jsonl"}, {"path": "b.jsonl", "weight": -1, "formt": "text"}, {"weight": 2},
            {"path": "c.jsonl", "format": "chat"}]})
    lines = [line.split(": ", 1)[1] for line in str(err.value).splitlines()]
    assert lines == ["data.sources[1].weight: expected a value in (0, inf), got -1",
                     "data.sources[1].formt: unknown key (did you mean 'format'?)",
                     "data.sources[2].path: missing; every source needs its own path",
                     "data.sources[3].format: expected one of messages, prompt_completion, alpaca, text, "
                     "preference, implicit_preference, unpaired_preference, got 'chat'"]
    from forge.recipes import runner

    monkeypatch.setattr(runner, "load_model", lambda *a: pytest.fail("loaded the model"))
    argv = ["train", "lora", "--set", "data.sources=[{path: a.jsonl, weight: 0}]", "--output-dir", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "forge: error: --set: data.sources[0].weight: expected a value in (0, inf), got 0")
    # A missing file is named with its source, also before the model loads.
    argv = ["train", "lora", "--set", f"data.sources=[{{path: {tmp_path}/nope.jsonl}}]", "--output-dir",
            str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"forge: error: data.sources[0]: data file '{tmp_path}/nope.jsonl' not found"


def test_text_and_chat_sources_do_not_mix(tmp_path, two_files):
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "raw"}])
    with pytest.raises(ForgeError, match=r"data.sources\[1\]: rows of shape 'text' .* cannot be mixed"):
        _mixed([{"path": two_files[0]}, {"path": text}])


def test_mixed_sources_train_end_to_end_with_a_held_out_fraction(two_files, tmp_path, capsys):
    a, b = two_files
    out = tmp_path / "run"
    argv = ["train", "lora", "--model", "builtin:tiny-llama", "--max-steps", "1", "--output-dir", str(out),
            "--set", f"data.sources=[{{path: {a}, weight: 1, max_samples: 10}}, {{path: {b}, weight: 1, max_samples: 10}}]",
            "--set", "data.eval_fraction=0.25", "--set", "data.max_length=32",
            "--set", "training.per_device_train_batch_size=4", "--set", "training.gradient_accumulation_steps=1"]
    assert cli.main(argv) == 0
    said = capsys.readouterr().out
    assert "forge: data: 2 sources mixed by weight (first_exhausted, seed 42)" in said
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("eval_loss" in h for h in state["log_history"])
    saved = forge.load_preset(str(out / "forge_preset.yaml"))
    assert [s["path"] for s in saved.data.sources] == [a, b]
