"""The resume check of ``forge doctor --resume``: two steps straight, against one step, save, resume.

On a tiny slice of the data the preset trains two optimizer steps, saving a checkpoint after
each. A second run starts from the first checkpoint alone (copied into a fresh directory)
and trains the second step. Every trainable weight and every figure logged at step 2 (loss,
learning rate, the forge/... figures of EMA, monitor, freezing) must be equal: a resume that
does not resume shows up here, not after a crash three days in. Trackers are switched off and
evaluation is left out; everything else is the preset's own.

Example:
    >>> check_resume(forge.load_preset("lora", {"model.name_or_path": "builtin:tiny-llama"}))
    Check(name='resume', status='OK', message='2 steps straight and 1 + resume + 1 end equal: ...')
"""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any

from forge.config.loader import Preset
from forge.core.paths import PRESET_FILE
from forge.doctor.result import FAIL, OK, Check

STEPS = 2
# Logged counters that are not training state: TRL counts the tokens its own process has seen,
# so a resumed run restarts that count (the weights and every other figure must still match).
NOT_STATE = ("num_tokens",)


def _tiny(preset: Preset, output_dir: Path) -> Preset:
    """The preset on a slice just big enough for two steps, checkpointing every step."""
    config = copy.deepcopy(preset.config)
    training = config["training"]
    batch = int(training.get("per_device_train_batch_size", 8)) * int(training.get("gradient_accumulation_steps", 1))
    training.update(max_steps=STEPS, save_strategy="steps", save_steps=1, logging_steps=1,
                    output_dir=str(output_dir), eval_strategy="no", report_to="none")
    training.pop("save_total_limit", None)
    data = config["data"]
    data.update(max_samples=max(4, STEPS * batch), eval_path=None, eval_split=None, eval_fraction=None)
    config["trackers"] = []
    return Preset(preset.name, preset.source, config)


def _trainable(model: Any) -> dict[str, Any]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _logged_at(history: list[dict[str, Any]], step: int) -> dict[str, float]:
    out = {}
    for entry in history:
        if entry.get("step") == step:
            out.update({k: v for k, v in entry.items() if isinstance(v, (int, float)) and k not in
                        ("step", "epoch", *NOT_STATE) and not k.startswith("train_")})
    return out


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, str | None]:
    """The largest absolute difference between two name -> tensor dicts, and where it is."""
    worst, where = 0.0, None
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            return float("inf"), name
        diff = float((a[name] - b[name]).abs().max()) if a[name].numel() else 0.0
        if diff > worst:
            worst, where = diff, name
    return worst, where


def check_resume(preset: Preset, workdir: str | None = None) -> Check:
    """Train 2 steps straight, and 1 step + save + resume + 1 step; compare weights and step-2 figures."""
    from forge.recipes.runner import train

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="forge-doctor-resume-"))
    straight_dir, resumed_dir = root / "straight", root / "resumed"
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the runs' own notes are not the doctor's
            straight = train(_tiny(preset, straight_dir), overwrite=True, doctor=False)
            first = straight_dir / "checkpoint-1"
            if not first.is_dir():
                return Check("resume", FAIL, "the two-step run saved no checkpoint-1 to resume from")
            resumed_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(first, resumed_dir / first.name)
            shutil.copy(straight_dir / PRESET_FILE, resumed_dir / PRESET_FILE)
            resumed = train(_tiny(preset, resumed_dir), resume=True, doctor=False)
        weights, where = compare(_trainable(straight.trainer.model), _trainable(resumed.trainer.model))
        logs_a = _logged_at(straight.log_history, STEPS)
        logs_b = _logged_at(resumed.log_history, STEPS)
        differing = sorted(k for k in set(logs_a) | set(logs_b) if logs_a.get(k) != logs_b.get(k))
        data = {"max_weight_difference": weights, "differing_figures": differing}
        if weights == 0.0 and not differing:
            return Check("resume", OK, f"{STEPS} steps straight and 1 step + save + resume + 1 step end with equal "
                         f"weights and equal step-{STEPS} figures ({len(logs_a)} compared)", data=data)
        problems = []
        if weights:
            problems.append(f"weights differ by up to {weights:.3g} (at {where})")
        if differing:
            problems.append(f"step-{STEPS} figures differ: {', '.join(differing[:6])}")
        return Check("resume", FAIL, f"a resumed run does not continue the interrupted one: {'; '.join(problems)}",
                     data=data)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
