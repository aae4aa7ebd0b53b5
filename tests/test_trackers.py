"""Tests for forge.trackers: one tiny-Llama run logs to TensorBoard, MLflow (sqlite) and W&B
(offline) at once, and each tracker's own files are read back with the tracker's own reader."""

from __future__ import annotations

import glob
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_tiny_llama
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations.integration_utils import (
    MLflowCallback,
    TensorBoardCallback,
    WandbCallback,
)

from forge.errors import ForgeError
from forge.trackers import (
    ForgeMLflowCallback,
    ForgeTensorBoardCallback,
    MissingTrackerError,
    from_preset,
    parse_trackers,
    redact,
    redact_yaml,
    specs_to_config,
)

HF_TOKEN = "hf_" + "Zq3" * 12  # shaped like a real Hugging Face token
WANDB_KEY = "0123456789abcdef" * 2 + "01234567"  # 40 hex characters
PASSWORD = "s3cr3t-Pa55"
# A token inside a logged forge text figure: redacted in what the trackers log (the console
# line the Trainer prints, which W&B captures, is the user's own output and not covered).
FIGURE_TOKEN = "hf_" + "Xy7" * 12
STEPS = 6
EVERY = 2  # histogram interval


def _preset_yaml() -> str:
    """A resolved preset with secrets in a secret-named key, a plain value and a URL."""
    return ("# Resolved forge preset 'demo' (from test).\n" + yaml.safe_dump({
        "method": "sft",
        "model": {"name_or_path": "builtin:tiny-llama", "revision": "a" * 40},
        "training": {"learning_rate": 0.001, "hub_token": HF_TOKEN, "run_name": "tiny",
                     "note": f"key {WANDB_KEY}"},
        "trackers": {"mlflow": {"tracking_uri": f"http://me:{PASSWORD}@mlflow.example.com"}},
    }, sort_keys=False))


def _dataset(n: int = 24, seq: int = 16) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (n, seq), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _args(out: Path, **kw) -> TrainingArguments:
    base = dict(per_device_train_batch_size=4, max_steps=STEPS, logging_steps=1,
                report_to="none", save_strategy="no", learning_rate=1e-3, disable_tqdm=True,
                seed=0, dataloader_pin_memory=False)
    base.update(kw)
    return TrainingArguments(str(out), **base)


class FakeFigures(TrainerCallback):
    """Stands in for the gradient monitor: forge figures put into ``logs`` before the trackers,
    and the gradients the trackers' histograms must describe, captured independently."""

    def __init__(self):
        self.grads: dict[int, dict[str, np.ndarray]] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        if step % EVERY == 0:
            blocks: dict[str, list[np.ndarray]] = {}
            for name, p in model.named_parameters():
                block = ("layer_%02d" % int(name.split(".")[2]) if name.startswith("model.layers.")
                         else "embeddings" if "embed_tokens" in name
                         else "head" if name.startswith("lm_head") else "other")
                blocks.setdefault(block, []).append(p.grad.detach().double().reshape(-1).numpy())
            self.grads[step] = {b: np.concatenate(v) for b, v in blocks.items()}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            logs["forge/grad_norm/layer_00"] = 0.5 * state.global_step
            if state.global_step == 1:
                logs["forge/autotune/choice"] = f"chunked (token {FIGURE_TOKEN})"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One training run with all three trackers; returns where each one wrote."""
    tmp = tmp_path_factory.mktemp("trackers")
    saved_env = dict(os.environ)
    saved_cwd = os.getcwd()
    os.chdir(tmp)  # MLflow puts artifacts under ./mlruns
    os.environ.pop("DISABLE_MLFLOW_INTEGRATION", None)
    os.environ.update(WANDB_DIR=str(tmp), WANDB_SILENT="true")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(key, None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls run fastest single-threaded on a shared CPU
    import mlflow
    import wandb

    try:
        uri = f"sqlite:///{tmp}/mlflow.db"
        preset = {"tensorboard": {"histogram_every": EVERY, "run_name": "tb-run"},
                  "wandb": {"project": "forge-test", "mode": "offline", "tags": ["tiny"],
                            "histogram_every": EVERY, "run_name": "wb-run"},
                  "mlflow": {"tracking_uri": uri, "experiment_name": "forge-test",
                             "tags": {"team": "nlp"}, "log_model": True, "run_name": "ml-run"}}
        specs, problems = parse_trackers(preset)
        assert problems == []
        args = _args(tmp / "out", report_to=["tensorboard", "wandb", "mlflow"], hub_token=HF_TOKEN)
        extra = from_preset(specs, None, args, _preset_yaml())
        assert args.report_to == []  # the stock callbacks would log everything a second time
        fake = FakeFigures()
        trainer = Trainer(model=make_tiny_llama(seed=0), args=args, train_dataset=_dataset(),
                          callbacks=[fake, *extra["callbacks"]])
        trainer.train()
        mlflow_run_id = mlflow.last_active_run().info.run_id
        wandb.finish()
        yield {"tmp": tmp, "out": tmp / "out", "uri": uri, "fake": fake, "trainer": trainer,
               "mlflow_run_id": mlflow_run_id}
    finally:
        torch.set_num_threads(threads)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _assert_no_secrets(blob: bytes) -> None:
    for secret in (HF_TOKEN, WANDB_KEY, PASSWORD):
        assert secret.encode() not in blob


# ----- parsing and wiring ----------------------------------------------------------------------

def test_parse_accepts_all_three_shapes_and_round_trips():
    names, _ = parse_trackers(["tensorboard", "mlflow"])
    mixed, _ = parse_trackers(["tensorboard", {"wandb": {"project": "x", "mode": "offline"}}])
    mapping, _ = parse_trackers({"wandb": {"project": "x", "mode": "offline"}, "mlflow": None})
    assert [s.name for s in names] == ["tensorboard", "mlflow"]
    assert mixed[1].project == "x" and mixed[1].mode == "offline"
    assert [s.name for s in mapping] == ["wandb", "mlflow"]
    again, problems = parse_trackers(specs_to_config(mapping))
    assert problems == [] and again == mapping
    off, _ = parse_trackers({"wandb": False, "tensorboard": True})  # a child preset turns one off
    assert [s.name for s in off] == ["tensorboard"]


def test_parse_reports_every_problem_with_did_you_mean():
    _, problems = parse_trackers({"wandb": {"projct": "x", "mode": "onlin"},
                                  "tensorbord": None, "mlflow": {"api_key": "k"},
                                  "tensorboard": {"histogram_every": -1}})
    assert problems == [
        "trackers.wandb.projct: unknown option (did you mean 'project'?)",
        "trackers.wandb.mode: expected 'online' | 'offline' | 'disabled' | null, got 'onlin'",
        "trackers.tensorbord: unknown tracker 'tensorbord', expected one of tensorboard, wandb, "
        "mlflow (did you mean 'tensorboard'?)",
        "trackers.mlflow.api_key: unknown option "
        "(a key that names a secret is never accepted here)",
        "trackers.tensorboard.histogram_every: -1 must be 0 (off) or a number of steps",
    ]
    assert parse_trackers(["wandb", "wandb"])[1] == ["trackers.1: wandb is listed twice"]
    assert parse_trackers(3)[1][0].startswith("trackers: expected a list")


def test_each_tracker_gets_exactly_one_callback(tmp_path, monkeypatch):
    monkeypatch.delenv("DISABLE_MLFLOW_INTEGRATION", raising=False)
    args = _args(tmp_path, report_to=["tensorboard", "mlflow", "wandb"])
    specs, _ = parse_trackers(["tensorboard", "mlflow"])
    extra = from_preset(specs, None, args, None)
    assert args.report_to == ["wandb"]  # trackers forge does not serve keep their stock callback
    trainer = Trainer(model=make_tiny_llama(), args=args, callbacks=extra["callbacks"])
    cbs = trainer.callback_handler.callbacks
    assert sum(isinstance(c, TensorBoardCallback) for c in cbs) == 1
    assert sum(isinstance(c, MLflowCallback) for c in cbs) == 1
    assert sum(isinstance(c, WandbCallback) for c in cbs) == 1
    assert any(type(c) is ForgeTensorBoardCallback for c in cbs)
    assert any(type(c) is ForgeMLflowCallback for c in cbs)


def test_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    specs, _ = parse_trackers(["wandb"])
    with pytest.raises(MissingTrackerError) as err:
        from_preset(specs, None, None, None)
    assert str(err.value) == ("trackers: wandb needs the 'wandb' package: "
                              'pip install "transformers-forge[wandb]"')
    assert isinstance(err.value, ForgeError) and isinstance(err.value, ImportError)


def test_disabled_mlflow_integration_is_respected(monkeypatch, caplog):
    monkeypatch.setenv("DISABLE_MLFLOW_INTEGRATION", "TRUE")
    specs, _ = parse_trackers(["mlflow"])
    with caplog.at_level(logging.WARNING, logger="forge.trackers"):
        assert from_preset(specs, None, None, None) == {"callbacks": []}
    assert "DISABLE_MLFLOW_INTEGRATION" in caplog.text


def test_redaction_of_keys_values_and_urls():
    out = redact({"hub_token": "abc", "pad_token": "<pad>", "max_tokens": 5, "api_key": None,
                  "model": {"revision": "a" * 40}, "note": f"use {HF_TOKEN}", "w": WANDB_KEY,
                  "uri": f"https://me:{PASSWORD}@host/x", "openai": "sk-proj-" + "x" * 30})
    assert out == {"hub_token": "<redacted>", "pad_token": "<pad>", "max_tokens": 5,
                   "api_key": None, "model": {"revision": "a" * 40}, "note": "use <redacted>",
                   "w": "<redacted>", "uri": "https://me:<redacted>@host/x",
                   "openai": "<redacted>"}
    text = redact_yaml(_preset_yaml())
    assert text.startswith("# Resolved forge preset")
    _assert_no_secrets(text.encode())
    assert yaml.safe_load(text)["training"]["learning_rate"] == 0.001


# ----- the trackers' own files -------------------------------------------------------------------

def test_tensorboard_events_have_forge_scalars_histograms_and_preset(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = run["out"] / "runs" / "tb-run"
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0,
                                                       "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    norms = {e.step: e.value for e in acc.Scalars("forge/grad_norm/layer_00")}
    assert norms == {s: pytest.approx(0.5 * s) for s in range(1, STEPS + 1)}
    assert len(acc.Scalars("train/loss")) == STEPS  # the stock names are kept
    for block in ("embeddings", "layer_00", "layer_01", "head"):
        events = acc.Histograms(f"forge/grad_hist/{block}")
        assert [e.step for e in events] == list(range(EVERY, STEPS + 1, EVERY))
        for event in events:  # against numpy on the gradients captured at that step
            h, ref = event.histogram_value, run["fake"].grads[event.step][block]
            counts, _ = np.histogram(ref, bins=64, range=(ref.min(), ref.max()))
            assert h.num == ref.size and h.min == pytest.approx(ref.min(), rel=1e-5)
            # float32 sums on the device: error relative to the magnitudes, not to the sum
            assert h.sum == pytest.approx(ref.sum(), abs=1e-5 * np.abs(ref).sum())
            assert h.sum_squares == pytest.approx((ref ** 2).sum(), rel=1e-4)
            assert sum(h.bucket) == ref.size
            # float32 edges may move a value sitting exactly on a bin boundary by one bin.
            assert np.abs(np.asarray(h.bucket) - counts).sum() <= 4
    texts = set(tags["tensors"])
    assert {"forge/preset/text_summary", "forge/autotune/choice/text_summary"} <= texts
    preset = acc.Tensors("forge/preset/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "learning_rate: 0.001" in preset and "<redacted>" in preset
    choice = acc.Tensors("forge/autotune/choice/text_summary")[0]
    assert choice.step == 1
    assert choice.tensor_proto.string_val[0].decode() == "chunked (token <redacted>)"
    assert FIGURE_TOKEN.encode() not in _all_bytes(logdir)
    _assert_no_secrets(_all_bytes(logdir))


def test_mlflow_run_has_metrics_params_preset_and_model(run):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=run["uri"])
    data = client.get_run(run["mlflow_run_id"])
    assert data.info.run_name == "ml-run" and data.data.tags["team"] == "nlp"
    history = client.get_metric_history(run["mlflow_run_id"], "forge/grad_norm/layer_00")
    assert {m.step: m.value for m in history} == {s: 0.5 * s for s in range(1, STEPS + 1)}
    assert len(client.get_metric_history(run["mlflow_run_id"], "loss")) == STEPS
    params = data.data.params
    assert params["forge.training.learning_rate"] == "0.001"
    assert params["forge.training.hub_token"] == "<redacted>"
    assert params["learning_rate"] == "0.001"  # the stock TrainingArguments params are kept
    assert data.data.tags["forge/autotune/choice"] == "chunked (token <redacted>)"
    artifacts = [a.path for a in client.list_artifacts(run["mlflow_run_id"])]
    assert "forge_preset.yaml" in artifacts and "model" in artifacts
    model_files = [a.path for a in client.list_artifacts(run["mlflow_run_id"], "model")]
    assert "model/model.safetensors" in model_files and "model/config.json" in model_files
    local = client.download_artifacts(run["mlflow_run_id"], "forge_preset.yaml", str(run["tmp"]))
    assert Path(local).read_text() == redact_yaml(_preset_yaml())
    stored = _all_bytes(run["tmp"] / "mlruns") + (run["tmp"] / "mlflow.db").read_bytes()
    _assert_no_secrets(stored)
    assert FIGURE_TOKEN.encode() not in stored


def _wandb_records(path: str) -> list:
    """Every record of a ``.wandb`` transaction log (LevelDB-style 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block, header = Path(path).read_bytes(), 32768, 7
    pos, pending, records = 7, b"", []  # the file opens with a 7-byte ':W&B' header
    while pos + header <= len(raw):
        if block - pos % block < header:  # a block's tail too short for a chunk header
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + header])
        if kind == 0 and length == 0:
            break
        data, pos = raw[pos + header:pos + header + length], pos + header + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):  # full, or last chunk of a record
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_has_metrics_histograms_and_config(run):
    (run_dir,) = glob.glob(str(run["tmp"] / "wandb" / "offline-run-*"))
    records = _wandb_records(glob.glob(os.path.join(run_dir, "*.wandb"))[0])
    by_kind: dict[str, list] = {}
    for r in records:
        by_kind.setdefault(r.WhichOneof("record_type"), []).append(r)
    start = by_kind["run"][0].run
    assert start.project == "forge-test" and start.display_name == "wb-run"
    assert list(start.tags) == ["tiny"]
    config = {}
    for r in by_kind["config"]:
        config.update({u.key: json.loads(u.value_json) for u in r.config.update})
    assert config["forge_preset"]["training"]["learning_rate"] == 0.001
    assert config["forge_preset"]["training"]["hub_token"] == "<redacted>"
    assert config["learning_rate"] == 0.001  # the stock TrainingArguments config is kept
    rows = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            for r in by_kind["history"]]
    norms = {row["train/global_step"]: row["forge/grad_norm/layer_00"] for row in rows
             if "forge/grad_norm/layer_00" in row}
    assert norms == {s: 0.5 * s for s in range(1, STEPS + 1)}
    assert all("train/loss" in row for row in rows if "forge/grad_norm/layer_00" in row)
    choices = [row["forge/autotune/choice"] for row in rows if "forge/autotune/choice" in row]
    assert choices == ["chunked (token <redacted>)"]
    hists = [row for row in rows if "forge/grad_hist/layer_01/_type" in row]
    assert [row["train/global_step"] for row in hists] == list(range(EVERY, STEPS + 1, EVERY))
    for row in hists:
        ref = run["fake"].grads[row["train/global_step"]]["layer_01"]
        assert row["forge/grad_hist/layer_01/_type"] == "histogram"
        assert sum(row["forge/grad_hist/layer_01/values"]) == ref.size
        assert row["forge/grad_hist/layer_01/bins"][0] == pytest.approx(ref.min(), rel=1e-5)
    preset_file = Path(run_dir, "files", "forge_preset.yaml")
    assert preset_file.read_text() == redact_yaml(_preset_yaml())
    _assert_no_secrets(_all_bytes(run["tmp"] / "wandb"))


# ----- failures ----------------------------------------------------------------------------------

def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path, caplog):
    class Flaky(ForgeTensorBoardCallback):
        calls = 0

        def _log(self, *args, **kwargs):
            Flaky.calls += 1
            if Flaky.calls >= 2:
                raise ConnectionError(f"server gone (token {HF_TOKEN})")
            super()._log(*args, **kwargs)

    flaky = Flaky(logging_dir=str(tmp_path / "tb"), histogram_every=1)
    trainer = Trainer(model=make_tiny_llama(), args=_args(tmp_path / "out", max_steps=4),
                      train_dataset=_dataset(), callbacks=[flaky])
    with caplog.at_level(logging.WARNING, logger="forge.trackers"):
        trainer.train()
    assert trainer.state.global_step == 4
    warnings = [r for r in caplog.records if r.name == "forge.trackers"]
    assert len(warnings) == 1 and Flaky.calls == 2
    assert "tensorboard tracker failed in on_log (ConnectionError" in warnings[0].getMessage()
    assert HF_TOKEN not in warnings[0].getMessage()
    assert flaky.tb_writer is None  # closed; later histogram events were not attempted


def test_an_unreachable_mlflow_server_warns_once_without_its_password(tmp_path, monkeypatch,
                                                                      caplog):
    import mlflow

    monkeypatch.delenv("DISABLE_MLFLOW_INTEGRATION", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast, no backoff
    callback = ForgeMLflowCallback(tracking_uri=f"http://me:{PASSWORD}@127.0.0.1:9",
                                   experiment_name="gone")
    trainer = Trainer(model=make_tiny_llama(), args=_args(tmp_path, max_steps=2),
                      train_dataset=_dataset(), callbacks=[callback])
    try:
        with caplog.at_level(logging.WARNING, logger="forge.trackers"):
            trainer.train()
    finally:
        mlflow.set_tracking_uri(None)  # the dead server must not linger for later tests
    assert trainer.state.global_step == 2 and callback.forge.failed
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "forge.trackers"]
    assert "mlflow tracker failed in on_train_begin" in warning and PASSWORD not in warning
    with pytest.raises(ForgeError, match="DISABLE_MLFLOW_INTEGRATION"):
        monkeypatch.setenv("DISABLE_MLFLOW_INTEGRATION", "TRUE")
        ForgeMLflowCallback()
