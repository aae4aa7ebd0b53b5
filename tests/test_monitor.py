"""Tests for forge.monitor: statistics against direct torch computations, anomaly policies,
resume, and the Trainer / PEFT / QLoRA / TRL-DPO integrations on tiny models."""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_llama
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from forge.monitor import (
    GradientAnomalyError,
    GradientMonitor,
    MonitorConfig,
    from_preset,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls run fastest single-threaded on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _groups(name: str) -> str:
    """Reference grouping written out by hand for the tiny Llama's parameter names."""
    name = name.removeprefix("base_model.model.")
    if name.startswith("model.embed_tokens"):
        return "embeddings"
    if name.startswith("model.layers."):
        return f"layer_{int(name.split('.')[2]):02d}"
    if name.startswith("model.norm"):
        return "norm"
    return "head" if name.startswith("lm_head") else "other"


def _direct(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """Per-block (gradient norm, zero fraction) straight from torch."""
    flat: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            flat.setdefault(_groups(name), []).append(p.grad.detach().reshape(-1))
    out = {}
    for g, parts in flat.items():
        v = torch.cat(parts).double()
        out[g] = (torch.linalg.vector_norm(v).item(), (v == 0).double().mean().item())
    return out


def _dataset(n: int = 32, seq: int = 16, seed: int = 0) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, seq), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _args(out, **kw) -> TrainingArguments:
    base = {"per_device_train_batch_size": 4, "max_steps": 4, "logging_steps": 1,
            "report_to": "none", "save_strategy": "no", "learning_rate": 1e-3,
            "disable_tqdm": True, "seed": 0, "dataloader_pin_memory": False}
    base.update(kw)
    return TrainingArguments(str(out), **base)


class Recorder(TrainerCallback):
    """Keeps what the Trainer logs, and the per-block norms at every optimizer step."""

    def __init__(self):
        self.logs, self.norms = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.norms.append(_direct(model))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs, step=state.global_step))


def _inject_nan(model, name: str, from_step: int, until_step: int = 10**9):
    """NaN in one parameter's gradient on optimizer steps [from_step, until_step]."""
    param = dict(model.named_parameters())[name]
    box = {"step": 0}

    class Stepper(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            box["step"] = state.global_step + 1

    param.register_hook(lambda g: g * float("nan") if from_step <= box["step"] <= until_step
                        else g)
    return Stepper()


# ----- statistics ----------------------------------------------------------------------


def test_block_norms_zero_fraction_and_update_ratio_match_direct_computation():
    model = make_tiny_llama(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    monitor = GradientMonitor().attach(model)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    expected = _direct(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert monitor.step(opt, loss=loss)
    m = monitor.flush_metrics()
    assert set(expected) == {"embeddings", "layer_00", "layer_01", "norm", "head"}
    for g, (norm, zero) in expected.items():
        assert m[f"forge/grad_norm/{g}"] == pytest.approx(norm, rel=1e-5)
        assert m[f"forge/zero_grad_frac/{g}"] == pytest.approx(zero, abs=1e-6)
        w = torch.cat([before[n].reshape(-1) for n in before if _groups(n) == g])
        d = torch.cat([(p.detach() - before[n]).reshape(-1)
                       for n, p in model.named_parameters() if _groups(n) == g])
        assert m[f"forge/weight_norm/{g}"] == pytest.approx(w.norm().item(), rel=1e-5)
        assert m[f"forge/update_ratio/{g}"] == pytest.approx(
            (d.norm() / w.norm()).item(), rel=1e-4)
    assert expected["embeddings"][1] > 0.1  # unused token rows: the zero fraction is exercised
    total = math.sqrt(sum(n * n for n, _ in expected.values()))
    assert m["forge/grad_norm_preclip"] == pytest.approx(total, rel=1e-5)
    assert m["forge/loss"] == pytest.approx(loss.item())

    # Clipping: post-clip norm equals the norm of the gradients clip_grad_norm_ leaves behind.
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    pre = math.sqrt(sum(n * n for n, _ in _direct(model).values()))
    monitor.step(opt, max_grad_norm=0.05)
    post = math.sqrt(sum(n * n for n, _ in _direct(model).values()))
    m = monitor.flush_metrics()
    assert m["forge/grad_norm_preclip"] == pytest.approx(pre, rel=1e-5)
    assert m["forge/grad_norm_postclip"] == pytest.approx(post, rel=1e-4)
    assert post == pytest.approx(0.05, rel=1e-3)


def test_trainer_metrics_match_direct_with_accumulation_and_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = make_tiny_llama(seed=2)
    rec = Recorder()
    monitor = GradientMonitor()
    args = _args(tmp_path, gradient_accumulation_steps=2, max_steps=3, max_grad_norm=0.0,
                 report_to=["tensorboard"])
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[monitor, rec])
    trainer.train()
    logs = [entry for entry in rec.logs if "loss" in entry]
    assert len(logs) == 3 and len(rec.norms) == 3
    for step, (entry, norms) in enumerate(zip(logs, rec.norms), 1):  # accumulated gradients, a log per step
        for g, (norm, zero) in norms.items():
            assert entry[f"forge/grad_norm/{g}"] == pytest.approx(norm, rel=1e-5)
            if step == 2:  # detail_every=10: zero fractions on step 1 (its window's first) and the last
                assert f"forge/zero_grad_frac/{g}" not in entry
            else:
                assert entry[f"forge/zero_grad_frac/{g}"] == pytest.approx(zero, abs=1e-6)
        assert entry["forge/grad_norm_preclip"] == pytest.approx(entry["grad_norm"], rel=1e-5)
        assert entry["forge/loss"] == pytest.approx(entry["loss"], rel=1e-5)
        assert entry["forge/tokens_per_second"] > 0
    (event_file,) = glob.glob(str(tmp_path / "runs" / "**" / "events.out.tfevents*"),
                              recursive=True)
    acc = EventAccumulator(event_file)
    acc.Reload()
    scalars = acc.Scalars("train/forge/grad_norm/layer_01")
    assert [s.step for s in scalars] == [1, 2, 3]
    assert [s.value for s in scalars] == pytest.approx(
        [n["layer_01"][0] for n in rec.norms], rel=1e-5)
    summary = json.loads((tmp_path / "monitor_summary.json").read_text())
    assert summary["steps_observed"] == 3 and len(summary["history"]) == 3


# ----- anomalies and policies ----------------------------------------------------------


class StepSnapshot(TrainerCallback):
    """Weights, optimizer and scheduler state right before and right after one step."""

    def __init__(self, step: int):
        self.step, self.before, self.after = step, None, None

    def _grab(self, model, optimizer, lr_scheduler):
        return ({k: v.clone() for k, v in model.state_dict().items()},
                copy.deepcopy(optimizer.state_dict()), copy.deepcopy(lr_scheduler.state_dict()),
                [g["lr"] for g in optimizer.param_groups])

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None,
                              lr_scheduler=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.before = self._grab(model, optimizer, lr_scheduler)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                    **kwargs):
        if state.global_step == self.step:
            self.after = self._grab(model, optimizer, lr_scheduler)


def _assert_identical(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_identical(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_identical(x, y)
    else:
        assert a == b


def test_nan_gradient_named_and_skipped_bit_identically(tmp_path):
    model = make_tiny_llama(seed=3)
    snap, rec = StepSnapshot(step=3), Recorder()
    monitor = GradientMonitor()  # on_nonfinite="skip" by default
    callbacks = [monitor, _inject_nan(model, DOWN, from_step=3, until_step=3), snap, rec]
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=5),  # clips at 1.0
                      train_dataset=_dataset(), callbacks=callbacks)
    trainer.train()
    (record,) = monitor.anomalies
    assert (record["kind"], record["param"], record["where"]) == ("nonfinite", DOWN, "layer_01")
    assert record["first_step"] == 3 and record["actions"] == {"skipped": 1}
    assert monitor.skipped_steps == [3]
    _assert_identical(snap.before, snap.after)  # weights, AdamW state, scheduler, learning rate
    assert trainer.state.global_step == 5  # training went on ...
    final = dict(model.named_parameters())[DOWN].detach()
    assert not torch.equal(final, snap.after[0][DOWN])  # ... and kept learning
    assert torch.isfinite(final).all()
    step3 = next(entry for entry in rec.logs if entry["step"] == 3)
    assert step3["forge/skipped_steps"] == 1.0


def test_consecutive_skip_limit_stops_with_message(tmp_path):
    model = make_tiny_llama(seed=4)
    monitor, after_step1 = GradientMonitor(max_consecutive_skips=2), StepSnapshot(step=1)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=8), train_dataset=_dataset(),
                      callbacks=[monitor, _inject_nan(model, DOWN, from_step=2), after_step1])
    with pytest.raises(GradientAnomalyError, match="2 consecutive optimizer steps were skipped"):
        trainer.train()
    assert monitor.skipped_steps == [2, 3]
    assert trainer.state.global_step == 3  # stopped inside step 4, before its update
    summary = json.loads((tmp_path / "monitor_summary.json").read_text())
    assert summary["skipped_steps"] == [2, 3]
    assert summary["anomalies"][0]["param"] == DOWN
    # Step 1 was applied; nothing after it reached the weights or the optimizer state.
    _assert_identical(after_step1.after[:2], (
        {k: v.clone() for k, v in model.state_dict().items()},
        copy.deepcopy(trainer.optimizer.state_dict())))


def test_stop_policy_raises_at_the_first_bad_step(tmp_path):
    model = make_tiny_llama(seed=4)
    monitor = GradientMonitor(on_nonfinite="stop")
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=_dataset(),
                      callbacks=[monitor, _inject_nan(model, DOWN, from_step=2)])
    with pytest.raises(GradientAnomalyError, match=r"step 2 \(on_nonfinite='stop'\)") as err:
        trainer.train()
    assert err.value.anomalies[0].param == DOWN
    assert trainer.state.global_step == 1


def test_loss_spike_flagged_and_skipped_at_its_step():
    model = make_tiny_llama(seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = GradientMonitor(on_spike="skip", warmup_steps=5).attach(model)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    applied = []
    for step in range(1, 15):
        # A constant added to the loss moves the loss only, not the gradients.
        loss = model(input_ids=ids, labels=ids).loss + (3.0 if step == 11 else 0.0)
        loss.backward()
        applied.append(monitor.step(opt, loss=loss))
        opt.zero_grad()
    (record,) = monitor.anomalies
    assert (record["kind"], record["first_step"], record["count"]) == ("spike", 11, 1)
    assert [i + 1 for i, ok in enumerate(applied) if not ok] == [11]


def test_zero_gradient_lora_adapter_flagged_by_name(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_llama(seed=6),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    dead = set()
    for name, p in model.named_parameters():  # a broken init: both LoRA factors zero
        if "layers.1.self_attn.q_proj.lora_" in name:
            torch.nn.init.zeros_(p.data)
            dead.add(name)
    monitor = GradientMonitor(dead_patience=2)
    rec = Recorder()
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=_dataset(),
                      callbacks=[monitor, rec])
    trainer.train()
    flagged = {r["param"] for r in monitor.anomalies if r["kind"] == "dead"}
    assert flagged == dead and len(dead) == 2  # LoRA A's zero step-1 gradient is not flagged
    assert all(r["first_step"] == 2 and r["where"] == "layer_01" for r in monitor.anomalies)
    blocks = {k.split("/")[-1] for k in rec.logs[0] if k.startswith("forge/grad_norm/")}
    assert blocks == {"layer_00", "layer_01"}  # only LoRA weights are trainable
    assert rec.logs[0]["forge/zero_grad_frac/layer_01"] > 0.4


# ----- resume and integrations ----------------------------------------------------------


def test_history_survives_resume(tmp_path):
    def run(out, resume=None):
        model = make_tiny_llama(seed=7)
        monitor = GradientMonitor(warmup_steps=1)
        args = _args(out, max_steps=6, logging_steps=2, save_strategy="steps", save_steps=3)
        Trainer(model=model, args=args, train_dataset=_dataset(n=48),
                callbacks=[monitor]).train(resume_from_checkpoint=resume)
        return monitor

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-3"))
    timing = ("tokens_per_second", "mfu", "memory")
    strip = [{k: v for k, v in h.items() if not any(t in k for t in timing)}
             for h in full.history]
    again = [{k: v for k, v in h.items() if not any(t in k for t in timing)}
             for h in resumed.history]
    assert [h["step"] for h in again] == [2, 4, 6]
    assert len(again) == len(strip)
    for a, b in zip(again, strip):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-6), k
    got, want = resumed.state_dict()["detector"], full.state_dict()["detector"]
    assert got.keys() == want.keys()
    for key in want:  # pytest >= 9 refuses approx on a dict of lists: compare per key
        assert got[key] == pytest.approx(want[key]), key
    assert resumed.state_dict()["steps_seen"] == full.state_dict()["steps_seen"] == 6


def test_qlora_4bit(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_tiny_llama(seed=8).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert "Linear4bit" in {type(m).__name__ for m in model.modules()}
    rec, monitor = Recorder(), GradientMonitor()
    trainer = Trainer(model=model, args=_args(tmp_path / "run", max_steps=3, max_grad_norm=0.0),
                      train_dataset=_dataset(), callbacks=[monitor, rec])
    trainer.train()
    assert all("lora_" in n for n in monitor.state_dict()["param_names"])
    last = rec.logs[2]
    for g in ("layer_00", "layer_01"):
        assert last[f"forge/grad_norm/{g}"] == pytest.approx(rec.norms[2][g][0], rel=1e-5)
        assert 0 < last[f"forge/update_ratio/{g}"] < 1
    assert monitor.anomalies == []


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["the cat sat on the mat", "a dog ran in the park", "what is two plus two",
             "four", "five", "the sky is blue", "the sky is green"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def test_dpo_trainer(tmp_path):
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_dict({
        "prompt": ["what is two plus two", "what colour is the sky"] * 4,
        "chosen": ["four", "the sky is blue"] * 4,
        "rejected": ["five", "the sky is green"] * 4,
    })
    rec, monitor = Recorder(), GradientMonitor()
    args = DPOConfig(str(tmp_path), per_device_train_batch_size=2, max_steps=3, logging_steps=1,
                     report_to="none", save_strategy="no", disable_tqdm=True,
                     dataloader_pin_memory=False, max_length=32, learning_rate=1e-3,
                     max_grad_norm=0.0, bf16=False)
    trainer = DPOTrainer(model=make_tiny_llama(seed=9), ref_model=make_tiny_llama(seed=9),
                         args=args, train_dataset=ds,
                         processing_class=_tiny_tokenizer(), callbacks=[monitor, rec])
    trainer.train()
    logs = [entry for entry in rec.logs if "loss" in entry]
    assert len(logs) == 3
    for entry, norms in zip(logs, rec.norms):
        for g, (norm, _) in norms.items():
            assert entry[f"forge/grad_norm/{g}"] == pytest.approx(norm, rel=1e-5)
        assert entry["forge/loss"] == pytest.approx(entry["loss"], rel=1e-5)
        assert any(k.startswith("rewards/") for k in entry)  # DPO's own metrics still there
    assert entry["forge/tokens_per_second"] > 0
    assert monitor.anomalies == []


def test_example_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "gradient_monitor_trainer.py"),
         "--output-dir", str(tmp_path), "--steps", "14"],
        capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GradientMonitor:" in proc.stdout and "nonfinite" in proc.stdout
    summary = json.loads((tmp_path / "monitor_summary.json").read_text())
    assert summary["skipped_steps"] and summary["anomalies"][0]["kind"] == "nonfinite"


# Each DDP rank runs this script: it imports only torch and forge.monitor, so two processes
# start quickly even on a busy machine.
_DDP_WORKER = """
import json, os, sys
import torch
import torch.distributed as dist
from forge.monitor import GradientMonitor

rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
# A file store, not a TCP port: other test runs on the machine cannot collide with it.
dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
ddp = torch.nn.parallel.DistributedDataParallel(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
monitor = GradientMonitor(on_spike="skip", warmup_steps=4).attach(model)
gen = torch.Generator().manual_seed(rank)
x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 1, generator=gen)
applied = []
for step in range(1, 11):
    # Only rank 1 sees the spike: DDP gradients agree across ranks, losses do not.
    loss = (ddp(x) - y).pow(2).mean() + (3.0 if rank == 1 and step == 8 else 0.0)
    loss.backward()
    applied.append(monitor.step(opt, loss=loss))
    opt.zero_grad()
weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
gathered = [torch.zeros_like(weights) for _ in range(world)]
dist.all_gather(gathered, weights)
with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
    json.dump({"skipped": [i + 1 for i, ok in enumerate(applied) if not ok],
               "same_weights": torch.equal(gathered[0], gathered[1])}, fh)
dist.barrier()
dist.destroy_process_group()
"""


def test_ddp_ranks_skip_together(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), "2", str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    try:
        outputs = [proc.communicate(timeout=240)[0] for proc in procs]  # fail, never hang
    finally:
        for proc in procs:
            proc.kill()
    assert all(proc.returncode == 0 for proc in procs), "\n".join(o[-2000:] for o in outputs)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["skipped"] for r in results] == [[8], [8]]  # rank 0 skips rank 1's spike too
    assert all(r["same_weights"] for r in results)


# ----- config ------------------------------------------------------------------------------


def test_config_and_preset_builder():
    assert from_preset(MonitorConfig(), None, None) == {}
    out = from_preset(MonitorConfig(enabled=True, on_spike="stop", log_every=5), None, None)
    (callback,) = out["callbacks"]
    assert isinstance(callback, GradientMonitor) and callback.config.on_spike == "stop"
    with pytest.raises(ValueError, match="on_spike: 'ignore'.*log_every"):
        MonitorConfig(on_spike="ignore", log_every=0)
    with pytest.raises(TypeError):
        GradientMonitor(no_such_option=1)
    assert not GradientMonitor(on_nonfinite="warn").gated


def test_state_dict_round_trip():
    model = make_tiny_llama(seed=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    first = GradientMonitor(log_every=2).attach(model)
    for step in range(1, 4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        first.step(opt, loss=loss)
        opt.zero_grad()
        if step == 2:
            first.flush_metrics()  # one closed interval, and step 3 left open
    state = json.loads(json.dumps(first.state_dict()))  # it is plain JSON
    second = GradientMonitor(log_every=2)
    second.load_state_dict(state)  # before attach: applied on attach
    second.attach(model)
    assert json.dumps(second.state_dict()) == json.dumps(first.state_dict())  # NaN-safe
    state = second.state_dict()
    assert state["last_step"] == 3 and len(second.history) == 1 and len(state["rows"]) == 1


def test_unlogged_intervals_are_closed_not_hoarded(monkeypatch):
    import forge.monitor.core as core

    monkeypatch.setattr(core, "MAX_INTERVAL", 3)
    model = make_tiny_llama(seed=11)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradientMonitor(on_nonfinite="warn").attach(model)  # nothing syncs per step
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(7):
        model(input_ids=ids, labels=ids).loss.backward()
        monitor.step(opt)
        opt.zero_grad()
    assert [h["step"] for h in monitor.history] == [3, 6]
    assert len(monitor.state_dict()["rows"]) == 1


def test_fp16_norms_are_unscaled_once(one_thread):
    """With fp16 and ``max_grad_norm: 0`` the Trainer unscales the gradients (it measures their
    norm with ``clip_grad_norm_(..., inf)``) before ``on_pre_optimizer_step``; the monitor must
    not divide by the loss scale again. A real ``torch.amp.GradScaler`` on CPU stands in for
    accelerate's; the reference is the norm of the unscaled loss's gradients."""
    from forge.monitor import GradientMonitor

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    x = torch.randn(16, 8)
    model(x).pow(2).mean().backward()
    want = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    for unscale_first in (False, True):
        model.zero_grad()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
        monitor = GradientMonitor(log_every=1, update_ratio=False).attach(model)
        monitor._scaler, monitor._optimizer = scaler, opt
        scaler.scale(model(x).pow(2).mean()).backward()
        if unscale_first:  # what the Trainer's grad-norm measurement does
            scaler.unscale_(opt)
        monitor._record(1, None, None, measure=True)
        got = monitor.flush_metrics()["forge/grad_norm_preclip"]
        assert got == pytest.approx(want, rel=1e-5), (unscale_first, got, want)


def test_details_are_measured_once_per_window_at_every_step_logging(tmp_path):
    """Update ratios and zero fractions (extra passes over the weights) once per detail_every
    steps; norms every step. A pure function of the step, so resume measures the same steps."""
    from forge.monitor.trainer import measures_details

    args = _args(tmp_path, max_steps=25)
    state = type("S", (), {"logging_steps": 1, "max_steps": 25})()
    assert [s for s in range(1, 26) if measures_details(args, state, s, None, 10)] == [1, 11, 21, 25]
    assert [s for s in range(1, 26) if measures_details(args, state, s, None, 1)] == list(range(1, 26))
    state.logging_steps = 5  # every logging step that opens a window of 10
    assert [s for s in range(1, 26) if measures_details(args, state, s, None, 10)] == [5, 15, 25]
    state.logging_steps = 10
    assert [s for s in range(1, 26) if measures_details(args, state, s, None, 10)] == [10, 20, 25]

    model = make_tiny_llama(seed=2)
    rec = Recorder()
    trainer = Trainer(model=model, args=_args(tmp_path / "run", max_steps=12, logging_steps=1),
                      train_dataset=_dataset(), callbacks=[GradientMonitor(detail_every=5), rec])
    trainer.train()
    logs = [entry for entry in rec.logs if "loss" in entry]
    measured = [e["step"] for e in logs if "forge/update_ratio" in e]
    assert measured == [1, 6, 11, 12]
    assert all("forge/grad_norm/layer_00" in e for e in logs)
