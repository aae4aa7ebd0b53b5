"""forge report shows every feature's figures (EMA, freeze, loss, autotune), not only the
monitor's, and the freeze schedule's changes: a real tiny `forge train` run with all four,
checked against the run's own files read here independently, and against what the schedule's
definition says its changes must be."""

from __future__ import annotations

import html as htmllib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from forge.config.loader import load_preset
from forge.recipes import runner
from forge.report import write_report

STEPS, EVERY = 6, 2
FEATURES = ("ema", "freeze", "loss", "autotune")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("features") / "run"
    preset = load_preset("demo", {
        "data.max_samples": 24, "data.max_length": 48, "training.max_steps": STEPS,
        "training.per_device_train_batch_size": 4, "training.gradient_accumulation_steps": 1,
        "training.logging_steps": 1, "training.save_strategy": "no", "training.output_dir": str(out),
        "ema": {"enabled": True, "decay": 0.7},
        "freeze": {"enabled": True, "schedule": "gradual", "every_n_steps": EVERY},
        "loss": {"strategy": "focal", "gamma": 2.0},
        "autotune": {"enabled": True, "max_memory": "4GB", "target_global_batch": 4}})
    runner.train(preset)
    torch.set_num_threads(threads)
    return out


def _section(page: str, name: str) -> str:
    found = re.search(rf'<section id="feature-{name}">(.*?)</section>', page, re.S)
    assert found, name
    return found.group(1)


def _table_rows(fragment: str) -> list[list[str]]:
    return [[htmllib.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", fragment) if "<td>" in row]


def _embedded(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="forge-series">(.*?)</script>', page, re.S)
    return json.loads(found.group(1).replace("<\\/", "</"))


def test_every_feature_has_its_figures_in_the_report(run_dir):
    page = write_report(run_dir).read_text(encoding="utf-8")
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    embedded = _embedded(page)["features"]
    for feature in FEATURES:
        prefix = f"forge/{feature}/"
        keys = sorted({k for e in history for k in e if k.startswith(prefix)})
        assert keys, feature  # the run logged the feature's figures
        rows = {r[0]: r for r in _table_rows(_section(page, feature))}
        assert sorted(k for k in rows if k.startswith(prefix)) == keys, feature
        for key in keys:
            points = [(e["step"], e[key]) for e in history if key in e]
            assert embedded[feature][key[len(prefix):]] == {"step": [s for s, _ in points],
                                                             "value": [v for _, v in points]}
            last = points[-1][1]
            assert rows[key][1] == (f"{last:.4g}" if isinstance(last, float) else str(last))
            assert rows[key][2] == str(points[-1][0]) and rows[key][5] == str(len(points))
    # Figures logged at every step are plotted; autotune's choice, logged once, is a table only.
    for feature in ("ema", "freeze", "loss"):
        assert (run_dir / "report" / f"feature_{feature}.png").stat().st_size > 5000
        assert "data:image/png;base64," in _section(page, feature)
    assert not (run_dir / "report" / "feature_autotune.png").exists()
    assert "not in this run" not in page


def test_freeze_schedule_changes_are_listed(run_dir):
    page = write_report(run_dir).read_text(encoding="utf-8")
    changes = _table_rows(_section(page, "freeze").split("Schedule changes", 1)[1])
    # Gradual unfreezing of 4 blocks, one stage every EVERY steps, the top block first.
    expected = [[str(k * EVERY), "gradual_unfreezing", str(k), ", ".join(str(b) for b in range(4 - k, 4))]
                for k in range(STEPS // EVERY)]
    assert changes == expected
    assert _embedded(page)["features"]["freeze_events"][1] == {"step": 2, "schedule": "gradual_unfreezing",
                                                                "period": 1, "blocks": [3]}


def test_a_feature_the_run_lacked_is_a_note_and_run_files_are_escaped(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report"))
    state = json.loads((copy / "trainer_state.json").read_text())
    evil = "<img src=x onerror=alert(1)>"
    for entry in state["log_history"]:
        for key in [k for k in entry if k.startswith(("forge/loss/", "forge/autotune/"))]:
            del entry[key]
        if "forge/ema/decay" in entry:
            entry[f"forge/ema/{evil}"] = 1.0
    (copy / "trainer_state.json").write_text(json.dumps(state))
    record = json.loads((copy / "forge_gradual_unfreezing.json").read_text())
    record["kind"] = evil
    (copy / "forge_gradual_unfreezing.json").write_text(json.dumps(record))
    page = write_report(copy).read_text(encoding="utf-8")
    assert "Adaptive loss: token weights: not in this run" in page
    assert "Batch autotuning: not in this run" in page
    assert 'id="feature-loss"' not in page and 'id="feature-autotune"' not in page
    # Outside the embedded JSON (where "</" cannot close the script) nothing comes through raw.
    markup = re.sub(r'<script type="application/json".*?</script>', "", page, flags=re.S)
    assert evil not in markup and htmllib.escape(evil) in markup
