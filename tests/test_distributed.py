"""Two CPU processes (gloo) against one: every forge feature under DDP (torchrun and
``accelerate launch --multi_gpu``), FSDP2 (``fully_shard``) and DeepSpeed ZeRO-2 / ZeRO-3
(``DS_ACCELERATOR=cpu``), each compared with a single process on the same global batch, plus
the launch mistakes forge refuses before training.

`tests/_dist_worker.py` runs EMA, the monitor (skip on a NaN put into ONE rank's gradient),
the freeze schedule (a static freeze under DeepSpeed, which refuses schedules), the focal loss
and TensorBoard with histograms, saves at step 2 and resumes from there into another
directory. Each launch is a few steps of the builtin tiny Llama, one thread per process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The accelerate CLI of this interpreter (a venv that is not activated has no `accelerate` on PATH).
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]

TESTS = Path(__file__).parent
WORKER = TESTS / "_dist_worker.py"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_torchrun = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS.parent), **extra)


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(_free_port()), *args]


def _launch(cmd: list[str], out: Path, **env: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([*cmd, str(out)], capture_output=True, text=True, env=_env(**env), cwd=out, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return out


def _reports(out: Path, ranks=(0, 1)) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in ranks]


def _figures(history: list[dict]) -> list[tuple]:
    keys = ("forge/loss", "forge/grad_norm_preclip", "forge/grad_norm_postclip", "forge/update_ratio")
    return [(h["step"], *(h.get(k, float("nan")) for k in keys)) for h in history]


def _close(a, b, rel=1e-4):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[0] == y[0]
        assert x[1:] == pytest.approx(y[1:], rel=rel, nan_ok=True), (x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the same global batch: with the freeze schedule, and with a static freeze."""
    root = tmp_path_factory.mktemp("single")
    return {kind: _launch([sys.executable, str(WORKER), kind], root / kind)
            for kind in ("single-gradual", "single-static")}


def _check_against(out: Path, ref: Path, atol: float) -> None:
    from safetensors.torch import load_file

    ranks, (single,) = _reports(out), _reports(ref, (0,))
    for report in ranks:
        # The NaN was on the last rank only; the global check made every rank skip step 3.
        assert report["full"]["skipped"] == report["resumed"]["skipped"] == single["full"]["skipped"] == [3]
        # Figures are global: the loss is the mean over ranks, norms of the full gradient.
        _close(_figures(report["full"]["history"]), _figures(single["full"]["history"]))
        _close(_figures(report["resumed"]["history"]), _figures(report["full"]["history"]), rel=1e-6)
        # Histograms at steps 2 and 4 (the resumed run: step 4), as clipped for the update.
        assert len(report["full"]["hists"]) == len(single["full"]["hists"]) == 2
        for got, want in zip(report["full"]["hists"] + report["resumed"]["hists"],
                             single["full"]["hists"] + single["full"]["hists"][1:], strict=True):
            assert got.keys() == want.keys()
            for block in want:
                assert got[block]["num"] == want[block]["num"]
                assert got[block]["sum"] == pytest.approx(want[block]["sum"], rel=1e-3, abs=1e-6)
                assert got[block]["max"] == pytest.approx(want[block]["max"], rel=1e-3)
    for name, atol_ in (("model.safetensors", atol), ("checkpoint-4/ema.safetensors", atol)):
        full, resumed, one = (load_file(d / name) for d in (out / "full", out / "resumed", ref / "full"))
        if "lm_head.weight" in full.keys() - one.keys():  # DeepSpeed writes the tied head out too
            torch.testing.assert_close(full.pop("lm_head.weight"), full["model.embed_tokens.weight"], rtol=0, atol=0)
            resumed.pop("lm_head.weight")
        assert full.keys() == one.keys()
        for key in one:
            torch.testing.assert_close(full[key], one[key], rtol=0, atol=atol_, msg=f"{name}: {key}")
            torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0, msg=f"resume {name}: {key}")
    assert (out / "full" / "runs").is_dir()  # TensorBoard events, from rank 0


@needs_torchrun
def test_ddp_torchrun_matches_one_process(reference, tmp_path):
    out = _launch(_torchrun(str(WORKER), "ddp"), tmp_path / "ddp")
    # Adam at lr 1e-2 turns float-rounding differences of the two-rank loss into ~1e-4.
    _check_against(out, reference["single-gradual"], atol=3e-4)


@needs_torchrun
def test_ddp_accelerate_launch_matches_one_process(reference, tmp_path):
    cmd = [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(WORKER), "ddp"]
    _check_against(_launch(cmd, tmp_path / "acc"), reference["single-gradual"], atol=3e-4)


@needs_torchrun
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed (pip install transformers-forge[distributed])")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_one_process(stage, reference, tmp_path):
    out = _launch(_torchrun(str(WORKER), f"zero{stage}"), tmp_path / f"zero{stage}", DS_ACCELERATOR="cpu")
    _check_against(out, reference["single-static"], atol=2e-5)


@needs_torchrun
def test_fsdp2_fully_shard_matches_one_process(tmp_path):
    out = _launch(_torchrun(str(TESTS / "_fsdp2_worker.py")), tmp_path / "fsdp2")
    for rank, report in enumerate(_reports(out)):
        sharded, single = report["fsdp"], report["ref"]
        assert sharded["skipped"] == single["skipped"] == [2]  # the NaN was in rank 1's shard only
        _close(_figures(sharded["history"]), _figures(single["history"]))
        assert sharded["ema_distance"] == pytest.approx(single["ema_distance"], rel=1e-4)
        for got, want in zip(sharded["hists"], single["hists"], strict=True):
            for block in want:
                assert got[block]["num"] == want[block]["num"]
                assert got[block]["sum"] == pytest.approx(want[block]["sum"], rel=1e-3, abs=1e-6)
        saved = {name: torch.load(out / f"{name}{rank}.pt", weights_only=True) for name in ("fsdp", "ref")}
        for part in ("weights", "ema"):
            for key, want in saved["ref"][part].items():
                torch.testing.assert_close(saved["fsdp"][part][key], want, rtol=0, atol=2e-5, msg=key)


# -- the forge CLI under torchrun ------------------------------------------------------------------
COMMON = ["--model", "builtin:tiny-llama", "--max-steps", "4",
          "--set", "data.max_samples=32", "--set", "data.max_length=48",
          "--set", "training.per_device_train_batch_size=2",
          "--set", "training.gradient_accumulation_steps=2",
          "--set", "training.logging_steps=1", "--set", "training.save_steps=2",
          "--set", "ema={enabled: true, decay: 0.9}"]


@needs_torchrun
def test_forge_train_under_torchrun(tmp_path):
    # dpo extends lora: the CLI, a LoRA adapter and TRL's DPO trainer (with its reference
    # forward) under DDP; the worker above covers the plain SFT path.
    out = tmp_path / "out"
    proc = subprocess.run(
        [*_torchrun("-m", "forge", "train", "dpo"), *COMMON, "--output-dir", str(out)],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Rank 0 alone prints the summary and writes the files.
    assert proc.stdout.count("forge: trained preset") == 1, proc.stdout[-2000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-4" / "ema.safetensors").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # Real DDP: 2 processes x 2 per device x 2 accumulation = 8 examples per step, so
    # 4 steps take exactly one pass over the 32 rows (a lone process would take half).
    assert state["log_history"][-1]["epoch"] == pytest.approx(1.0)
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in proc.stderr


# -- launch mistakes: one line, at config time, once ---------------------------------------------------
def test_accelerate_cpu_launch_without_mpirun_is_refused_once(tmp_path):
    proc = subprocess.run(
        [*ACCELERATE, "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "forge", "train", "lora", *COMMON, "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("forge: error:")]
    assert len(errors) == 1 and "mpirun" in errors[0] and "torchrun" in errors[0], proc.stderr[-3000:]
    # (accelerate's launcher prints its own traceback for the exit code 2; forge's process none)
    assert "forge/recipes" not in proc.stderr and not (tmp_path / "out").exists()


def _args(**fields):
    from types import SimpleNamespace

    return SimpleNamespace(**{"deepspeed": None, "fsdp": [], "use_cpu": False, **fields})


def _refusal(args, features=None, env=None) -> str:
    from forge.errors import ForgeError
    from forge.recipes.launch import check_launch

    with pytest.raises(ForgeError) as err:
        check_launch(args, features or {}, env or {})
    assert "\n" not in str(err.value)
    return str(err.value)


def test_launch_mistakes_are_refused_before_training(monkeypatch):
    from forge.layers.config import FreezeConfig
    from forge.recipes import launch

    monkeypatch.setattr(launch, "_has_accelerator", lambda: False)
    accelerate_cpu = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert "mpirun" in _refusal(_args(), env=accelerate_cpu)
    launch.check_launch(_args(), {}, {**accelerate_cpu, "WORLD_SIZE": "2"})  # torchrun set it: fine
    assert "FSDP on GPUs only" in _refusal(_args(fsdp=["full_shard"]))
    assert "FSDP on GPUs only" in _refusal(_args(), env={"ACCELERATE_USE_FSDP": "true"})
    assert "drops DeepSpeed" in _refusal(_args(deepspeed={"zero_optimization": {"stage": 2}}, use_cpu=True))
    # autotune, however DeepSpeed is configured (preset, or accelerate's config file / flags)
    gathered = {"zero_optimization": {"stage": 2}}
    for args, env in ((_args(deepspeed=gathered), {}), (_args(), {"ACCELERATE_USE_DEEPSPEED": "true"})):
        assert _refusal(args, {"autotune": object()}, env).startswith("autotune: DeepSpeed")
    schedule = FreezeConfig(enabled=True, schedule="gradual", every_n_steps=2)
    assert _refusal(_args(deepspeed=gathered), {"freeze": schedule}).startswith("freeze.schedule")
    launch.check_launch(_args(deepspeed=gathered), {"freeze": FreezeConfig(enabled=True, ratio=0.5)}, {})
    assert "stage3_gather_16bit_weights_on_model_save" in _refusal(_args(deepspeed={"zero_optimization": {"stage": 3}}))
    launch.check_launch(_args(deepspeed={"zero_optimization": {
        "stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}), {"ema": object()}, {})


def test_autotune_refuses_deepspeed_from_accelerate_env(monkeypatch):
    from forge.autotune.config import place_for_training
    from forge.errors import ForgeError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ForgeError, match="autotune: FSDP and DeepSpeed"):
        place_for_training(torch.nn.Linear(2, 2), _args())


def test_sharded_state_dict_final_save_is_full(tmp_path):
    """With SHARDED_STATE_DICT checkpoints the final model is saved with a full state dict."""
    from types import SimpleNamespace

    from forge.recipes.checkpoints import save_final_model

    seen = []

    class Plugin:
        state_dict_type = "StateDictType.SHARDED_STATE_DICT"

        def set_state_dict_type(self, kind):
            self.state_dict_type = kind

    plugin = Plugin()
    trainer = SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
                              save_model=lambda d: seen.append((d, plugin.state_dict_type)))
    save_final_model(trainer, str(tmp_path))
    assert seen == [(str(tmp_path), "FULL_STATE_DICT")]
    assert plugin.state_dict_type == "StateDictType.SHARDED_STATE_DICT"  # checkpoints stay sharded
