"""The run's output directory: refused when it holds something else, cleared of an earlier run
with ``--overwrite``, and given the resolved preset first (``forge train --resume`` reads it)."""

from __future__ import annotations

from pathlib import Path

from forge.core.io import atomic_write_text
from forge.core.paths import DOCTOR_FILE, PRESET_FILE
from forge.errors import ForgeError

# What a previous forge run leaves in its output directory (besides the tokenizer files the
# next save overwrites anyway). `--overwrite` removes these, so that nothing of the old run
# (its checkpoints, monitor summary, weights of another kind) mixes into the new one.
RUN_FILES = ("trainer_state.json", "monitor_summary.json", "autotune.json", "all_results.json",
             "train_results.json", "eval_results.json", "training_args.bin", "config.json",
             "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "adapter_model.safetensors", "adapter_config.json", "ema.safetensors", PRESET_FILE,
             # the freeze schedule's record of its changes (forge/layers/schedule.py)
             "forge_gradual_unfreezing.json", "forge_lp_lora.json", "forge_lisa.json", DOCTOR_FILE)
RUN_DIRS = ("report", "runs", "adapter_init")


def check_output_dir(output_dir: str, overwrite: bool, resume: bool) -> None:
    """Refuse to write into a non-empty directory unless told to (or resuming there)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ForgeError(f"output directory '{output_dir}' is a file")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        raise ForgeError(
            f"output directory '{output_dir}' exists and is not empty; pass --overwrite to "
            "write into it, --resume to continue its run, or choose another --output-dir"
        )


def clear_previous_run(output_dir: str) -> list[str]:
    """Remove what an earlier forge run wrote into ``output_dir`` (``--overwrite``).

    Only a directory forge wrote (it holds ``forge_preset.yaml``) is cleared, and only of
    forge's and the Trainer's own outputs; any other file stays. Returns what was removed.
    """
    import shutil

    import yaml

    root = Path(output_dir)
    preset_file = root / PRESET_FILE
    if not preset_file.is_file():
        return []
    names = set(RUN_FILES)
    try:  # the old run may have written its monitor summary under another name
        old = yaml.safe_load(preset_file.read_text(encoding="utf-8")) or {}
        summary = (old.get("monitor") or {}).get("summary_file") if isinstance(old, dict) else None
        if isinstance(summary, str) and "/" not in summary and summary not in ("", ".", ".."):
            names.add(summary)
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        pass
    removed = []
    for entry in sorted(root.iterdir()):
        is_run_dir = entry.is_dir() and (entry.name in RUN_DIRS or entry.name.startswith("checkpoint-"))
        if is_run_dir:
            shutil.rmtree(entry)
        elif entry.is_file() and entry.name in names:
            entry.unlink()
        else:
            continue
        removed.append(entry.name)
    return removed


def write_preset_file(preset_yaml: str, output_dir: str) -> None:
    """The resolved preset next to the run's checkpoints (``forge train --resume`` reads it)."""
    atomic_write_text(Path(output_dir, PRESET_FILE), preset_yaml)
