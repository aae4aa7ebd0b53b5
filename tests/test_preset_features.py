"""forge feature sections in a preset reach `forge train`: autotune, trackers, the report,
and the docs page generated from the schema is current."""

from __future__ import annotations

import json
from pathlib import Path

from forge import cli
from forge.config.docs import render

FAST = ["--model", "builtin:tiny-llama", "--max-steps", "4", "--set", "data.max_samples=64",
        "--set", "data.max_length=48", "--set", "training.logging_steps=1",
        "--set", "training.save_strategy=steps", "--set", "training.save_steps=2"]


def test_autotune_trackers_and_report_through_the_cli(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    argv = ["train", "demo", *FAST, "--output-dir", str(out),
            "--set", "autotune={enabled: true, max_memory: 64MB, target_global_batch: 16}",
            "--set", "monitor=true", "--set", "trackers=[tensorboard]",
            "--set", "training.per_device_train_batch_size=2"]
    assert cli.main(argv) == 0
    choice = json.loads((out / "checkpoint-4" / "autotune.json").read_text())
    per_device = choice["per_device_train_batch_size"]
    assert per_device * choice["gradient_accumulation_steps"] == 16
    args = json.loads((out / "trainer_state.json").read_text())
    assert args["train_batch_size"] == per_device  # the trainer really ran the tuned batch
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0}).Reload()
    tags = acc.Tags()["scalars"]
    # Trainer scalars keep their stock names; forge's figures are under forge/.
    assert "train/loss" in tags and "forge/grad_norm/layer_00" in tags, tags
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    html = Path(capsys.readouterr().out.strip().rsplit(" ", 1)[-1])
    assert html.is_file() and html.suffix == ".html"


def test_autotune_cli_needs_a_budget_on_cpu(capsys):
    assert cli.main(["autotune", "demo"]) == 2
    assert "--max-memory" in capsys.readouterr().err


def test_autotune_cli_prints_its_table(capsys):
    assert cli.main(["autotune", "demo", "--max-memory", "64MB", "--target-global-batch", "16",
                     "--set", "data.max_samples=32", "--set", "data.max_length=48"]) == 0
    printed = capsys.readouterr().out
    assert "probe" in printed.lower() and "16" in printed


def test_presets_doc_is_generated_from_the_schema():
    doc = Path(__file__).parent.parent / "docs" / "presets.md"
    assert doc.read_text() == render(), "run: python -m forge.config.docs > docs/presets.md"
