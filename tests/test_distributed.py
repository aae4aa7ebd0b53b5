"""Two CPU processes (torchrun, gloo): `forge train` runs real DDP for the LoRA and DPO
presets, with forge features on, and only rank 0 writes the output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

COMMON = ["--model", "builtin:tiny-llama", "--max-steps", "4",
          "--set", "data.max_samples=32", "--set", "data.max_length=48",
          "--set", "training.per_device_train_batch_size=2",
          "--set", "training.gradient_accumulation_steps=2",
          "--set", "training.logging_steps=1", "--set", "training.save_steps=2",
          "--set", "ema={enabled: true, decay: 0.9}"]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
@pytest.mark.parametrize("preset", ["lora", "dpo"])
def test_forge_train_under_torchrun(preset, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29500 + (os.getpid() % 1000)), "-m", "forge", "train", preset,
         *COMMON, "--output-dir", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=400)
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
