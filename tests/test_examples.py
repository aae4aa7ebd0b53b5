"""Every script in examples/ runs offline and finishes cleanly, and says what it shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))

# What each script must print, beyond exiting 0: the thing it demonstrates happened.
EXPECTED = {
    "ema_trainer.py": ["eval_ema_loss"],
    "freeze_layers_trainer.py": ["frozen tensors bit-identical after training: True",
                                 "<- chosen", "LISA draws:"],
    "adaptive_loss_trainer.py": ["fused loss matches standard"],
    "gradient_monitor_trainer.py": ["last log:"],
    "preset_in_python.py": ["lora preset in plain TRL: loss"],
    "workflow_in_python.py": ["held-out perplexity: trained", "model.safetensors", "merged model answers:"],
    "doctor_trainer.py": ["FAIL  eos:", "OK    eos:"],
    "lr_find_trainer.py": ["suggested learning rate", "trained at it"],
}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    # One thread: on a 2-core CI box, tiny models run faster without thread contention.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="offline", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in EXPECTED.get(script.name, []):
        assert text in proc.stdout, f"{script.name} did not print {text!r}"
