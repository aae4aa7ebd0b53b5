"""forge lr-find and forge sweep: the range test's schedule and suggestion, the search space's
checks, and a sweep that finishes, survives an interrupt without repeating a trial, prunes, and
names the best trial of its own table.

Whether the suggestion is a good rate is measured against real demo runs in
``benchmarks/bench_lr_find.py`` (docs/benchmarks.md); these tests keep to seconds.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from forge import cli
from forge.tune.lr_find import exponential_lrs, lr_find, smooth_losses, suggest_lr

FAST = {"data.max_samples": 40, "data.max_length": 64, "training.max_steps": 4,
        "training.per_device_train_batch_size": 4, "training.logging_steps": 2, "training.eval_steps": 2,
        "data.eval_fraction": 0.2}


def test_suggestion_is_the_steepest_point_of_a_known_curve():
    lrs = exponential_lrs(1e-6, 1.0, 121)
    # Falls fastest (per decade) at 1e-3, bottoms out, then blows up past 1e-1.
    curve = [5 - 3 * math.tanh((math.log10(lr) + 3) / 0.7) + (50 * (lr - 0.1) if lr > 0.1 else 0) for lr in lrs]
    index, caveats = suggest_lr(lrs, curve)
    assert lrs[index] == pytest.approx(1e-3, rel=0.13)  # one grid step is 12%
    assert not [c for c in caveats if "range" in c]
    # A curve that only rises gives no suggestion, and says why.
    index, caveats = suggest_lr(lrs, sorted(curve))
    assert index is None and "only rose" in caveats[0]


def test_smoothing_is_a_debiased_ema():
    losses = [4.0, 2.0, 3.0]
    beta = 0.9
    ema, out = 0.0, []
    for t, x in enumerate(losses, 1):
        ema = beta * ema + (1 - beta) * x
        out.append(ema / (1 - beta ** t))
    assert smooth_losses(losses, beta) == pytest.approx(out)


class RecordLR(TrainerCallback):
    def __init__(self):
        self.lrs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "learning_rate" in logs:
            self.lrs.append(logs["learning_rate"])


def test_lr_find_trains_with_the_exponential_schedule_and_restores_the_trainer(tmp_path, one_thread):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (64, 16), generator=gen).tolist()
    model = make_tiny_llama()
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-3, report_to="none",
                             max_steps=7, logging_steps=5, disable_tqdm=True, use_cpu=True)
    recorder = RecordLR()
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
                      callbacks=[recorder])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = lr_find(trainer, start_lr=1e-5, end_lr=1e-1, num_steps=20)
    assert len(result.losses) == 20 and result.lrs == pytest.approx(exponential_lrs(1e-5, 1e-1, 20))
    # The rate the Trainer itself logged for each step is the schedule's.
    assert recorder.lrs == pytest.approx(result.lrs, rel=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (args.max_steps, args.logging_steps) == (7, 5) and trainer.optimizer is None
    assert result.suggestion is not None and 1e-5 <= result.suggestion <= 1e-1


def test_forge_lr_find_cli_prints_a_set_line_and_a_plot(tmp_path, capsys, one_thread):
    out = tmp_path / "lr"
    code = cli.main(["lr-find", "demo", "--steps", "12", "--start-lr", "1e-4", "--end-lr", "0.1", "--out", str(out),
                     "--set", "data.max_samples=48", "--set", "training.per_device_train_batch_size=8"])
    printed = capsys.readouterr().out
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "lr_find.json").is_file()
    if code == 0:
        line = printed.strip().splitlines()[-1]
        assert line.startswith("--set training.learning_rate=") and float(line.split("=")[1]) > 0
    else:
        assert "no suggestion" in printed


def _space(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_bad_space_is_one_error_line_per_key_before_anything_runs(tmp_path, capsys):
    pytest.importorskip("optuna")
    space = _space(tmp_path, "training.learning_rate: {log_uniform: [0, 1.0e-3]}\n"
                             "training.learnig_rate: {uniform: [0.1, 0.2]}\n"
                             "peft.r: {choice: []}\n"
                             "training.warmup_ratio: {normal: [0, 1]}\n"
                             "training.per_device_train_batch_size: {int: [0, 4]}\n")
    sweep_dir = tmp_path / "sweep"
    assert cli.main(["sweep", "demo", "--space", space, "--trials", "2", "--output-dir", str(sweep_dir)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("forge: error:")]
    # The structural problems first (all at once), then the preset's own verdict on the values.
    assert len(errors) == 3, errors
    for key in ("training.learning_rate", "peft.r", "training.warmup_ratio"):
        assert any(f": {key}: " in e for e in errors), key
    assert not sweep_dir.exists()
    fixed = _space(tmp_path, "training.learnig_rate: {uniform: [0.1, 0.2]}\n"
                             "training.per_device_train_batch_size: {int: [0, 4]}\n", "values.yaml")
    assert cli.main(["sweep", "demo", "--space", fixed, "--trials", "2", "--output-dir", str(sweep_dir)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("forge: error:")]
    assert len(errors) == 2 and "did you mean 'learning_rate'" in errors[0] and "batch_size" in errors[1]
    assert not sweep_dir.exists()


def _read(sweep_dir):
    with open(sweep_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_finishes_resumes_after_an_interrupt_without_repeating_and_names_its_best(tmp_path, monkeypatch,
                                                                                        one_thread):
    optuna = pytest.importorskip("optuna")
    from forge.recipes import runner
    from forge.tune.sweep import STUDY_FILE, STUDY_NAME, sweep

    space = _space(tmp_path, "training.learning_rate: {log_uniform: [1.0e-3, 3.0e-2]}\n")
    sweep_dir = tmp_path / "sweep"
    real_train, calls = runner.train, []

    def interrupted_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises, in the middle of a trial
        return real_train(*args, **kwargs)

    monkeypatch.setattr(runner, "train", interrupted_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        sweep("demo", space, trials=4, sweep_dir=sweep_dir, overrides=FAST, pruner=optuna.pruners.NopPruner())
    first = _read(sweep_dir)
    assert [r["state"] for r in first] == ["complete", "complete", "fail"]

    # A process killed outright leaves its trial RUNNING; the rerun must not count it either.
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{sweep_dir / STUDY_FILE}")
    study.ask()
    monkeypatch.setattr(runner, "train", real_train)
    result = sweep("demo", space, trials=4, sweep_dir=sweep_dir, overrides=FAST, pruner=optuna.pruners.NopPruner())
    rows = _read(sweep_dir)
    done = [r for r in rows if r["state"] == "complete"]
    assert len(done) == 4 and result.ran == 2
    assert [r["state"] for r in rows] == ["complete", "complete", "fail", "fail", "complete", "complete"]
    rates = [float(r["training.learning_rate"]) for r in done]
    assert len(set(rates)) == 4  # none repeated
    assert [r["eval_loss"] for r in done[:2]] == [r["eval_loss"] for r in first[:2]]  # kept, not rerun
    assert len({r["output_dir"] for r in done}) == 4 and all(Path(r["output_dir"]).is_dir() for r in done)
    best = min(done, key=lambda r: float(r["eval_loss"]))
    assert result.best["trial"] == int(best["trial"])
    assert optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{sweep_dir / STUDY_FILE}").best_trial.number \
        == int(best["trial"])
    page = (sweep_dir / "report.html").read_text()
    assert f"Best: trial {best['trial']}" in page

    # Asking for no more than it has runs nothing.
    assert sweep("demo", space, trials=4, sweep_dir=sweep_dir, overrides=FAST).ran == 0


def test_sweep_prunes_on_eval_loss(tmp_path, one_thread):
    optuna = pytest.importorskip("optuna")
    from forge.tune.sweep import sweep

    space = _space(tmp_path, "training.learning_rate: {choice: [0.003]}\n")
    # A pruner that stops every trial at its first report: each stops at its first evaluation.
    result = sweep("demo", space, trials=1, sweep_dir=tmp_path / "sweep",
                   overrides={**FAST, "training.max_steps": 6}, pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    row = result.rows[0]
    assert row["state"] == "pruned" and row["steps"] == 2 and row["note"] == "pruned at step 2"
    assert result.best is None


def test_sweep_without_optuna_says_what_to_install(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    space = _space(tmp_path, "training.learning_rate: {log_uniform: [1.0e-4, 1.0e-3]}\n")
    assert cli.main(["sweep", "demo", "--space", space, "--trials", "1", "--output-dir", str(tmp_path / "s")]) == 2
    assert 'pip install "transformers-forge[sweep]"' in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
