"""Run a preset end to end: model, tokenizer, data, TRL trainer, forge features, save.

This is what ``forge train`` calls; from Python it is one line:

Example:
    >>> import forge
    >>> result = forge.train(forge.load_preset("lora", {"training.max_steps": 20}))
    >>> result.output_dir
    'outputs/lora'
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge._console import is_main_process, note
from forge.checkpoints import (CheckpointCompleteCallback, is_complete,
                               last_complete_checkpoint, writes_markers)
from forge.config import FEATURE_SECTIONS, has_eval
from forge.data import load_examples
from forge.errors import ForgeError
from forge.modeling import adapter_base, load_model, load_tokenizer, model_max_positions
from forge.presets import Preset

PRESET_FILE = "forge_preset.yaml"


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    output_dir: str
    metrics: dict[str, float]
    log_history: list[dict[str, Any]] = field(default_factory=list)
    trainer: Any = None


# What a previous forge run leaves in its output directory (besides the tokenizer files the
# next save overwrites anyway). `--overwrite` removes these, so that nothing of the old run
# (its checkpoints, monitor summary, weights of another kind) mixes into the new one.
RUN_FILES = ("trainer_state.json", "monitor_summary.json", "autotune.json", "all_results.json",
             "train_results.json", "eval_results.json", "training_args.bin", "config.json",
             "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "adapter_model.safetensors", "adapter_config.json", "ema.safetensors", PRESET_FILE)
RUN_DIRS = ("report", "runs")


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


def load_datasets(preset: Preset) -> tuple[Any, Any]:
    """The training set and the evaluation set (or None) a preset describes."""
    data = preset.data
    train_ds = load_examples(data.path, preset.method, data.format, data.split, data.max_samples)
    eval_ds = None
    if data.eval_path or data.eval_split:
        eval_ds = load_examples(data.eval_path or data.path, preset.method, data.format,
                                data.eval_split or data.split)
    elif data.eval_fraction:
        seed = preset.config["training"].get("seed", 42)
        split = train_ds.train_test_split(test_size=data.eval_fraction, seed=seed)
        train_ds, eval_ds = split["train"], split["test"]
    return train_ds, eval_ds


def feature_kwargs(preset: Preset, model: Any, args: Any, train_dataset: Any = None,
                   tokenizer: Any = None) -> dict[str, Any]:
    """Extra trainer arguments from the forge feature sections and the trackers.

    Each feature module's ``from_preset(cfg, model, args)`` returns trainer keyword
    arguments; callbacks from all of them are concatenated. ``autotune`` runs first, since
    it changes the batch size in ``args`` that the others (and the trainer) then see; the
    trackers come last, so they also see the features' figures.
    """
    out: dict[str, Any] = {"callbacks": []}

    def merge(section: str, extra: dict[str, Any]) -> None:
        out["callbacks"].extend(extra.pop("callbacks", []))
        for key, value in extra.items():
            if key in out:
                raise ForgeError(f"{section}: conflicts with another section over '{key}'")
            out[key] = value

    for section in FEATURE_SECTIONS:  # autotune is first in the table
        cfg = preset.feature(section)
        if cfg is None:
            continue
        module = importlib.import_module(FEATURE_SECTIONS[section].split(":")[0])
        if section == "autotune":
            merge(section, module.from_preset(cfg, model, args, train_dataset, tokenizer))
        else:
            merge(section, module.from_preset(cfg, model, args))
    from forge import trackers

    merge("trackers", trackers.from_preset(preset.tracker_specs(), model, args, preset.to_yaml()))
    # Last, so it marks a checkpoint complete only after every other callback saved into it.
    out["callbacks"].append(CheckpointCompleteCallback())
    return out


def build_trainer(preset: Preset, resume: bool | str = False) -> Any:
    """Load everything a preset names and return the ready TRL trainer (not yet trained).

    ``resume`` (True for the newest checkpoint in the output dir, or a path) is recorded in
    ``args.resume_from_checkpoint`` so that features restore their state from it.
    """
    import trl
    from transformers import set_seed

    args = preset.training_args()
    if resume:
        args.resume_from_checkpoint = (
            get_last_checkpoint(args.output_dir) if resume is True else str(resume))
    if has_eval(preset.data) and "eval_strategy" not in preset.config["training"]:
        args.eval_strategy = "steps"  # an eval set the user gave should be used
    # Seed before the model loads, so LoRA's random init is reproducible too.
    set_seed(args.seed)
    # Cheapest checks first: a bad data row should not wait for a model download.
    train_ds, eval_ds = load_datasets(preset)
    tokenizer = load_tokenizer(preset.model)
    _cap_max_length(args, preset)
    quantization = preset.quantization_config()
    base = adapter_base(preset.model.name_or_path)
    if base is not None:
        note(_adapter_note(preset, base))
    model = load_model(preset.model, quantization, preset.peft_config())
    extra = feature_kwargs(preset, model, args, train_ds, tokenizer)
    trainer_cls = trl.SFTTrainer if preset.method == "sft" else trl.DPOTrainer
    accepted = inspect.signature(trainer_cls.__init__).parameters
    late = {k: extra.pop(k) for k in list(extra) if k not in accepted}
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, **extra)
    if quantization is not None:
        _keep_adapters_in_float32(trainer.model)
    for key, value in late.items():
        # e.g. DPOTrainer takes no optimizer_cls_and_kwargs; the base Trainer reads the
        # attribute when it creates the optimizer, so setting it before train() is enough.
        setattr(trainer, key, value)
    return trainer


def _adapter_note(preset: Preset, base: str) -> str:
    """What forge does with a saved adapter given as the model, in one line."""
    where = f"model: {preset.model.name_or_path} is an adapter of {base}"
    if preset.peft_config() is None:
        return f"{where}; it is merged into the base for a full fine-tune"
    reference = "; DPO's reference is a frozen copy of it" if preset.method == "dpo" else ""
    return (f"{where}; that adapter trains further (the preset's peft: section is not used), so "
            f"the saved result on that base is the model of both stages{reference}")


def _cap_max_length(args: Any, preset: Preset) -> None:
    """Never ask for more positions than the model has: cap ``max_length`` with a note.

    Past ``max_position_embeddings`` a model's position table ends (transformers only warns
    about the indexing), so a preset default of 1024 on a 512-position model must not stand.
    """
    limit = model_max_positions(preset.model)
    wanted = getattr(args, "max_length", None)
    if limit and wanted and wanted > limit:
        note(f"data.max_length {wanted} is more than the {limit} positions the model has; using {limit}")
        args.max_length = limit


def _keep_adapters_in_float32(model: Any) -> None:
    """Undo TRL's cast of QLoRA adapters to bf16, so resumed runs train what the first did.

    TRL's SFTTrainer casts the trainable adapter weights of a quantized model to bf16, but on
    resume transformers reloads them from the checkpoint in float32 (PEFT's default), so a
    resumed QLoRA run would silently train in another dtype than the run it continues. forge
    keeps them in float32 from the start: exact resume, and adapter updates that bf16 would
    round away are kept (the adapters are a few MB, so the memory cost is small).
    """
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def train(preset: Preset, overwrite: bool = False, resume: bool | str = False) -> TrainResult:
    """Train a preset and save the model (or adapter) and resolved preset to the output dir.

    Args:
        preset: from :func:`forge.load_preset`.
        overwrite: allow writing into a non-empty output directory.
        resume: True to continue from the newest checkpoint in the output directory, or a
            checkpoint path.

    Returns:
        A :class:`TrainResult` with the output directory and the final metrics.

    Raises:
        ForgeError: any mistake in the preset, the data or the paths, in one line.
    """
    output_dir = preset.get_args_dict()["output_dir"]
    check_output_dir(output_dir, overwrite, bool(resume))
    if resume is True and get_last_checkpoint(output_dir) is None:
        raise ForgeError(f"--resume: no complete checkpoint-* directory in '{output_dir}'")
    if isinstance(resume, str) and not Path(resume).is_dir():
        raise ForgeError(f"--resume: checkpoint '{resume}' not found")
    if isinstance(resume, str) and not is_complete(resume, writes_markers(Path(resume).parent)):
        raise ForgeError(f"--resume: checkpoint '{resume}' is incomplete (an interrupted save?)")
    if overwrite and not resume and is_main_process():
        removed = clear_previous_run(output_dir)
        if removed:
            note(f"--overwrite: removed the previous run's {', '.join(removed)} from {output_dir}")
    trainer = build_trainer(preset, resume)
    if trainer.args.resume_from_checkpoint:
        note(f"resuming from {trainer.args.resume_from_checkpoint}")
    if trainer.is_world_process_zero():
        # Written first, so a run that crashes can be resumed with `forge train --resume CKPT`.
        write_preset_file(preset, output_dir)
    result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        write_preset_file(preset, output_dir)
        # The loss curve and metrics, in the Trainer's own format, for reports and tests.
        trainer.state.save_to_json(str(Path(output_dir, "trainer_state.json")))
    return TrainResult(output_dir=output_dir, metrics=dict(result.metrics),
                       log_history=list(trainer.state.log_history), trainer=trainer)


def write_preset_file(preset: Preset, output_dir: str) -> None:
    """The resolved preset next to the run's checkpoints (``forge train --resume`` reads it)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    Path(output_dir, PRESET_FILE).write_text(preset.to_yaml(), encoding="utf-8")


def get_last_checkpoint(output_dir: str) -> str | None:
    """The newest complete ``checkpoint-N`` directory in ``output_dir``, or None."""
    return last_complete_checkpoint(output_dir)
