"""Tests for forge.report: a real tiny run (gradient monitor, EMA evaluation, an injected NaN,
checkpoints) is turned into HTML + PNGs, and every plotted series is checked against the
run's own files read independently."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from forge.ema import EMACallback
from forge.errors import ForgeError
from forge.monitor import GradientMonitor
from forge.report import collect_series, load_run, write_report
from forge.report.__main__ import main

STEPS, NAN_STEP = 8, 5
BAD_PARAM = "model.layers.1.mlp.down_proj.weight"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class InjectNaN(TrainerCallback):
    """Poisons one parameter's gradient at one optimizer step, so the monitor logs an anomaly."""

    def __init__(self, model: torch.nn.Module):
        self.current = 0
        param = dict(model.named_parameters())[BAD_PARAM]
        param.register_hook(lambda g: g * float("nan") if self.current == NAN_STEP else g)

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = state.global_step + 1


def _dataset(n: int, seed: int) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, 16), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run laid out as `forge train` leaves it (trainer_state.json at the top)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls run fastest single-threaded on a shared CPU
    out = tmp_path_factory.mktemp("report") / "run"
    model = make_tiny_llama(seed=0)
    args = TrainingArguments(
        str(out), max_steps=STEPS, per_device_train_batch_size=4, logging_steps=1,
        eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
        learning_rate=1e-3, report_to="none", disable_tqdm=True, seed=0,
        dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(32, 0),
                      eval_dataset=_dataset(8, 1),
                      callbacks=[GradientMonitor(), EMACallback(decay=0.9, eval_with_ema=True),
                                 InjectNaN(model)])
    trainer.train()
    trainer.state.save_to_json(str(out / "trainer_state.json"))
    (out / "forge_preset.yaml").write_text(
        "# Resolved forge preset 'tiny'\nmethod: sft\ntraining:\n  learning_rate: 0.001\n"
        "  hub_token: hf_" + "Q" * 34 + "\n", encoding="utf-8")
    torch.set_num_threads(threads)
    return out


def _embedded_series(html: str) -> dict:
    found = re.search(r'<script type="application/json" id="forge-series">(.*?)</script>',
                      html, re.S)
    return json.loads(found.group(1).replace("<\\/", "</"))


def _points(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [h for h in history if key in h]
    return [h["step"] for h in rows], [h[key] for h in rows]


def test_report_writes_html_and_pngs_from_the_runs_files(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report" / "report.html"
    html = path.read_text(encoding="utf-8")
    for name in ("loss_lr", "grad_norm_heatmap", "eval_ema", "throughput"):
        png = run_dir / "report" / f"{name}.png"
        assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 5000
        assert f'id="{name}"' in html and "data:image/png;base64," in html  # self-contained
    assert "hub_token: &lt;redacted&gt;" in html and "hf_QQQQ" not in html  # preset, redacted

    # Every series, against the files read here without forge's help.
    series = _embedded_series(html)
    state = json.loads((run_dir / "trainer_state.json").read_text())
    history = state["log_history"]
    for key in ("loss", "learning_rate", "eval_loss", "eval_ema_loss"):
        steps, values = _points(history, key)
        assert series[key] == {"step": steps, "value": values}, key
    assert series["eval_loss"]["step"] == [4, 8] and series["eval_ema_loss"]["step"] == [4, 8]

    summary = json.loads((run_dir / "monitor_summary.json").read_text())
    rows = [h for h in summary["history"] if any("/grad_norm/layer_" in k for k in h)]
    heat = series["grad_norm"]
    assert heat["source"] == "monitor_summary.json"
    assert heat["steps"] == [h["step"] for h in rows] == list(range(1, STEPS + 1))
    assert heat["blocks"] == ["embeddings", "layer_00", "layer_01", "norm", "head"]
    for block, line in zip(heat["blocks"], heat["values"]):
        key = next(k for k in rows[0] if k.endswith("/grad_norm/" + block))
        expected = [h.get(key) for h in rows]
        assert line == pytest.approx(expected, nan_ok=True)
    # The NaN step: the monitor records it, and it is both an anomaly and a skipped step.
    assert NAN_STEP in [a["step"] for a in series["anomalies"] if a["kind"] == "nonfinite"]
    assert series["skipped_steps"] == summary["skipped_steps"] == [NAN_STEP]
    tps_key = next(k for k in rows[0] if k.endswith("/tokens_per_second"))
    assert series["tokens_per_second"]["value"] == _points(history, tps_key)[1]


def test_checkpoints_alone_still_make_a_report(run_dir, tmp_path):
    """A run stopped before the end has only checkpoint states; their histories are merged."""
    copy = tmp_path / "stopped"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report"))
    (copy / "trainer_state.json").unlink()
    shutil.rmtree(copy / "checkpoint-8")
    run = load_run(copy)
    assert run.sources == ["checkpoint-4/trainer_state.json"]
    series = collect_series(run)
    assert series["loss"]["step"] == [1, 2, 3, 4]
    # Both checkpoints: the later one supersedes, nothing is counted twice.
    both = collect_series(load_run(_without_final(run_dir, tmp_path / "both")))
    assert both["loss"]["step"] == list(range(1, STEPS + 1))


def _without_final(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("report"))
    (dest / "trainer_state.json").unlink()
    return dest


def test_missing_series_are_notes_not_errors(tmp_path):
    """A bare Trainer state (no monitor, no eval): the loss plot only, and a note per gap."""
    state = {"global_step": 3, "log_history": [
        {"step": s, "loss": 3.0 - s / 2, "learning_rate": 1e-3} for s in (1, 2, 3)]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    path = write_report(tmp_path, tmp_path / "out")
    html = path.read_text()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["loss_lr.png"]
    assert "no per-block gradient norms" in html and "no evaluation loss" in html
    assert "no throughput series" in html
    assert _embedded_series(html)["loss"] == {"step": [1, 2, 3], "value": [2.5, 2.0, 1.5]}


def test_not_a_run_directory_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(ForgeError, match="has no trainer_state.json"):
        write_report(tmp_path)
    assert main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"forge: error: run directory '{tmp_path / 'nowhere'}' not found")
    assert os.path.exists(tmp_path) and not (tmp_path / "report").exists()
