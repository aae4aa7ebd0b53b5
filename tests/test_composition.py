"""Every forge feature beside every other: each pair of {EMA, monitor, freeze schedule, adaptive
loss, autotune, trackers} and all of them together, through `forge train`'s runner, with checks
that mean something:

* every parameter that trained is averaged (the EMA equals an average computed independently,
  with ``torch.optim.swa_utils``, over the weights after every step) and watched (the monitor
  reports a gradient norm for its block at every step it trained, and none while frozen);
* no false anomaly (the monitor's ``on_dead`` is ``stop``, so a frozen block taken for dead
  would end the run);
* the tracker's event files hold each enabled feature's ``forge/...`` figures;
* resume from a mid-run checkpoint equals the uninterrupted run.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import TrainerCallback

from forge.config.loader import load_preset
from forge.recipes import runner

STEPS = 6
RESPONSE = [1, 68, 304, 306, 202]  # "<|im_start|>assistant\n" in the demo tokenizer
USER = [1, 265, 329, 202]

FEATURES = {
    "ema": {"ema": {"enabled": True, "decay": 0.7}},
    "monitor": {"monitor": {"enabled": True, "on_dead": "stop", "dead_patience": 1, "log_every": 1}},
    "gradual": {"freeze": {"enabled": True, "schedule": "gradual", "every_n_steps": 2}},
    "lisa": {"freeze": {"enabled": True, "schedule": "lisa", "every_n_steps": 2, "lisa_active_layers": 2}},
    "focal": {"loss": {"strategy": "focal", "gamma": 2.0}},
    "response_only": {"loss": {"strategy": "response_only", "response_template": RESPONSE,
                               "instruction_template": USER}},
    "dft": {"loss": {"strategy": "dft"}},
    "entropy": {"loss": {"strategy": "entropy"}},
    "hard_tokens": {"loss": {"strategy": "hard_tokens", "top_fraction": 0.5}},
    "autotune": {"autotune": {"enabled": True, "max_memory": "4GB", "target_global_batch": 4}},
    "trackers": {"trackers": ["tensorboard"]},
}
KINDS = {"ema": ["ema"], "monitor": ["monitor"], "freeze": ["gradual", "lisa"],
         "loss": ["focal", "response_only"], "autotune": ["autotune"], "trackers": ["trackers"]}
# Every pair of kinds, with every variant of each.
PAIRS = [(x, y) for a, b in itertools.combinations(KINDS, 2) for x in KINDS[a] for y in KINDS[b]]


class Trajectory(TrainerCallback):
    """The weights after every optimizer step (the independent reference's input)."""

    def __init__(self):
        self.initial: dict[str, torch.Tensor] = {}
        self.weights: list[dict[str, torch.Tensor]] = []
        self.trainable: list[set[str]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.trainable.append({n for n, p in model.named_parameters() if p.requires_grad})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})


def _preset(tmp_path, names, steps=STEPS, **extra):
    overrides = {"model.name_or_path": "builtin:tiny-llama", "data.max_samples": 24, "data.max_length": 48,
                 "training.max_steps": steps, "training.per_device_train_batch_size": 4,
                 "training.gradient_accumulation_steps": 1, "training.logging_steps": 1,
                 "training.learning_rate": 1e-2, "training.save_strategy": "steps", "training.save_steps": 3,
                 "training.output_dir": str(tmp_path / "out"), **extra}
    for name in names:
        for section, value in FEATURES[name].items():
            overrides[section] = value
    return load_preset("demo", overrides)


def _run(tmp_path, names, monkeypatch, resume=False, **extra):
    trajectory = Trajectory()
    real = runner._build

    def build(config, resume_arg):
        trainer = real(config, resume_arg)
        trainer.add_callback(trajectory)
        return trainer

    monkeypatch.setattr(runner, "_build", build)
    initial = None
    result = runner.train(_preset(tmp_path, names, **extra), resume=resume)
    return result, trajectory, initial


def _callback(trainer, cls_name):
    return next((c for c in trainer.callback_handler.callbacks if type(c).__name__ == cls_name), None)


def _check(result, trajectory, names, tmp_path):
    trainer = result.trainer
    model = trainer.model
    final = dict(model.named_parameters())
    trained = {n for step in trajectory.trainable for n in step}
    if "ema" in names:
        ema = _callback(trainer, "EMACallback").ema
        shadow = ema.shadow
        assert trained <= set(shadow), sorted(trained - set(shadow))[:3]  # every trained weight averaged
        avg_fn = torch.optim.swa_utils.get_ema_avg_fn(decay=0.7)
        for name in sorted(trained)[::7]:
            ref = trajectory.initial[name].clone()  # the EMA starts as a copy of the weights
            for k, step in enumerate(trajectory.weights, start=1):
                ref = avg_fn(ref, step[name], torch.tensor(k))
            torch.testing.assert_close(shadow[name], ref, rtol=1e-5, atol=1e-6, msg=name)
    if "monitor" in names:
        monitor = _callback(trainer, "GradientMonitor")
        assert monitor.anomalies == []  # on_dead=stop: a frozen block taken for dead ends the run
        assert trained <= set(monitor._core.plan.names)
        from forge.core.trainable import trainable_set

        ts = trainable_set(model)
        for step, names_now in enumerate(trajectory.trainable, start=1):
            entry = next(h for h in monitor.history if h["step"] == step)
            groups_now = {ts.group_of(n) for n in names_now}
            reported = {k.split("/")[-1] for k in entry if k.startswith("forge/grad_norm/")}
            assert reported == groups_now, (step, reported ^ groups_now)  # watched while training only
    if any(n in names for n in ("gradual", "lisa")):
        assert len(trajectory.trainable) == STEPS and len({frozenset(s) for s in trajectory.trainable}) > 1
    if "trackers" in names:
        tags = _tensorboard_tags(tmp_path / "out")
        wanted = {"ema": "forge/ema/", "monitor": "forge/grad_norm/", "gradual": "forge/freeze/",
                  "lisa": "forge/freeze/", "focal": "forge/loss/weight_mean", "autotune": "forge/autotune/",
                  "response_only": "forge/loss/supervised_fraction"}
        for name in names:
            if name in wanted:
                assert any(t.startswith(wanted[name]) for t in tags), (name, sorted(tags)[:20])
    del final


def _tensorboard_tags(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in out.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags.update(acc.Tags().get("scalars", []))
    return tags


@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_each_pair_of_features(pair, tmp_path, monkeypatch, one_thread):
    names = list(pair)
    if "trackers" not in names:
        names.append("trackers")  # the figures check needs a tracker; trackers alone is the pair
    result, trajectory, _ = _run(tmp_path, names, monkeypatch)
    assert result.trainer.state.global_step == STEPS
    _check(result, trajectory, names, tmp_path)


ALL = ["ema", "monitor", "autotune", "trackers"]


@pytest.mark.parametrize("schedule, strategy", [("gradual", "focal"), ("lisa", "response_only"),
                                                ("gradual", "dft"), ("lisa", "entropy"),
                                                ("gradual", "hard_tokens")])
def test_everything_together(schedule, strategy, tmp_path, monkeypatch, one_thread):
    names = [*ALL, schedule, strategy]
    result, trajectory, _ = _run(tmp_path, names, monkeypatch)
    _check(result, trajectory, names, tmp_path)


@pytest.mark.parametrize("schedule", ["gradual", "lisa"])
def test_everything_together_resumes_exactly(schedule, tmp_path, monkeypatch, one_thread):
    names = [*ALL, schedule, "focal"]
    full, _, _ = _run(tmp_path / "full", names, monkeypatch)
    full_weights = {n: p.detach().clone() for n, p in full.trainer.model.named_parameters()}
    full_ema = _callback(full.trainer, "EMACallback").ema.shadow
    # The same run, continued from its checkpoint at step 3 (as after a kill) in a new directory.
    resumed, _, _ = _run(tmp_path / "resumed", names, monkeypatch,
                         resume=str(tmp_path / "full" / "out" / "checkpoint-3"))
    assert resumed.trainer.state.global_step == STEPS
    for name, param in resumed.trainer.model.named_parameters():
        torch.testing.assert_close(param, full_weights[name], rtol=0, atol=0, msg=name)
    ema = _callback(resumed.trainer, "EMACallback").ema.shadow
    for name, tensor in full_ema.items():
        torch.testing.assert_close(ema[name], tensor, rtol=0, atol=0, msg=name)
    monitor = _callback(resumed.trainer, "GradientMonitor")
    assert [h["step"] for h in monitor.history] == list(range(1, STEPS + 1))


def test_a_skipped_step_leaves_ema_untouched(tmp_path, monkeypatch, one_thread):
    class NaNAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.step = state.global_step + 1
            if not hasattr(self, "hook"):
                param = model.get_input_embeddings().weight
                self.hook = param.register_hook(lambda g: g * float("nan") if self.step == 3 else g)

    real = runner._build
    trajectory = Trajectory()

    def build(config, resume_arg):
        trainer = real(config, resume_arg)
        trainer.add_callback(NaNAtStep3())
        trainer.add_callback(trajectory)
        return trainer

    monkeypatch.setattr(runner, "_build", build)
    result = runner.train(_preset(tmp_path, ["ema", "monitor"]))
    monitor = _callback(result.trainer, "GradientMonitor")
    assert monitor.skipped_steps == [3]
    # The reference averages the weights after the applied steps only.
    shadow = _callback(result.trainer, "EMACallback").ema.shadow
    avg_fn = torch.optim.swa_utils.get_ema_avg_fn(decay=0.7)
    applied = [w for k, w in enumerate(trajectory.weights, start=1) if k != 3]
    name = "model.layers.1.mlp.down_proj.weight"
    ref = trajectory.initial[name].clone()
    for k, step in enumerate(applied, start=1):
        ref = avg_fn(ref, step[name], torch.tensor(k))
    torch.testing.assert_close(shadow[name], ref, rtol=1e-5, atol=1e-6)
