"""Run a preset end to end: model, tokenizer, data, the three phases, TRL trainer, save.

This is what ``forge train`` calls; from Python it is one line:

Example:
    >>> import forge
    >>> result = forge.train(forge.load_preset("lora", {"training.max_steps": 20}))
    >>> result.output_dir
    'outputs/lora'

The order (see :mod:`forge.recipes.phases`): the cheap checks first (arguments, output
directory, data rows, tokenizer), then the model with quantization and PEFT, then the model
transforms, memory planning and callbacks, then the trainer.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge.config.loader import Preset
from forge.config.methods import METHOD_TABLE, trainer_class
from forge.config.schema import has_eval
from forge.core.console import is_main_process, note
from forge.core.io import atomic_write_text, disk_full, is_disk_full
from forge.core.paths import STATE_FILE, checkpoint_dir
from forge.errors import ForgeError
from forge.recipes.adapter_init import changes_base, save_as_lora, save_initial_adapter
from forge.recipes.checkpoints import (
    check_resumable,
    is_complete,
    last_complete_checkpoint,
    save_final_model,
    unmarked_up_to,
    write_run_file,
)
from forge.recipes.launch import check_launch
from forge.recipes.mixing import load_datasets as _load_data
from forge.recipes.model import adapter_base, load_model, load_tokenizer, model_max_positions
from forge.recipes.output import claim_output_dir, clear_previous_run, trackers_inside, write_preset_file
from forge.recipes.packing import packing_note
from forge.recipes.phases import Run, RunConfig
from forge.recipes.space import checkpoint_bytes


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    output_dir: str
    metrics: dict[str, float]
    log_history: list[dict[str, Any]] = field(default_factory=list)
    trainer: Any = None


def load_datasets(preset: Preset | RunConfig) -> tuple[Any, Any]:
    """The training set and the evaluation set (or None) a preset describes (one source, or
    several mixed: :mod:`forge.recipes.mixing`)."""
    return _load_data(preset.data, preset.method, _seed(preset))


def _seed(preset: Preset | RunConfig) -> int:
    if isinstance(preset, RunConfig):
        return int(preset.training_args.seed)
    return int(preset.config["training"].get("seed", 42))


def build_trainer(preset: Preset, resume: bool | str = False) -> Any:
    """Load everything a preset names and return the ready TRL trainer (not yet trained).

    ``resume`` (True for the newest checkpoint in the output dir, or a path) is recorded in
    ``args.resume_from_checkpoint`` so that features restore their state from it.
    """
    return _build(RunConfig.from_preset(preset), resume)


def _build(config: RunConfig, resume: bool | str) -> Any:
    from transformers import set_seed

    args = config.training_args
    if resume:
        args.resume_from_checkpoint = (
            get_last_checkpoint(args.output_dir) if resume is True else str(resume))
    if has_eval(config.data) and "eval_strategy" not in config.explicit_training:
        args.eval_strategy = "steps"  # an eval set the user gave should be used
    # Seed before the model loads, so LoRA's random init is reproducible too.
    set_seed(args.seed)
    # Cheapest checks first: a bad data row should not wait for a model download.
    train_ds, eval_ds = load_datasets(config)
    tokenizer = load_tokenizer(config.model)
    _cap_max_length(args, config)
    if config.method == "sft" and packing_note(args):
        note(packing_note(args))
    base = adapter_base(config.model.name_or_path)
    if base is not None:
        note(_adapter_note(config, base))
    model = load_model(config.model, config.quantization, config.peft)
    if config.peft is not None and changes_base(config.peft) and base is None and is_main_process():
        save_initial_adapter(model, args.output_dir)  # PiSSA & co: saved as plain LoRA at the end
    run = Run(config, model, tokenizer, train_ds, eval_ds)
    run.transform_model()
    run.plan_memory()
    run.add_callbacks()
    extra = dict(run.trainer_kwargs)
    trainer_cls = trainer_class(config.method)  # the method table: forge.config.methods
    if METHOD_TABLE[config.method].experimental:
        note(f"method {config.method}: TRL's {trainer_cls.__name__} from {trainer_cls.__module__} "
             "(trl.experimental: TRL may change it in any release)")
    accepted = inspect.signature(trainer_cls.__init__).parameters
    late = {k: extra.pop(k) for k in list(extra) if k not in accepted}
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, **extra)
    if config.quantization is not None:
        _keep_adapters_in_float32(trainer.model)
    for key, value in late.items():
        # e.g. DPOTrainer takes no optimizer_cls_and_kwargs; the base Trainer reads the
        # attribute when it creates the optimizer, so setting it before train() is enough.
        setattr(trainer, key, value)
    return trainer


def _adapter_note(config: RunConfig, base: str) -> str:
    """What forge does with a saved adapter given as the model, in one line."""
    where = f"model: {config.model.name_or_path} is an adapter of {base}"
    if config.peft is None:
        return f"{where}; it is merged into the base for a full fine-tune"
    reference = (f"; {config.method.upper()}'s reference is a frozen copy of it"
                 if METHOD_TABLE[config.method].reference else "")
    return (f"{where}; that adapter trains further (the preset's peft: section is not used), so "
            f"the saved result on that base is the model of both stages{reference}")


def _cap_max_length(args: Any, config: RunConfig) -> None:
    """Never ask for more positions than the model has: cap ``max_length`` with a note.

    Past ``max_position_embeddings`` a model's position table ends (transformers only warns
    about the indexing), so a preset default of 1024 on a 512-position model must not stand.
    """
    limit = model_max_positions(config.model)
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


def train(preset: Preset, overwrite: bool = False, resume: bool | str = False, doctor: bool = True,
          callbacks: Sequence[Any] = ()) -> TrainResult:
    """Train a preset and save the model (or adapter) and resolved preset to the output dir.

    The output directory is claimed first (:func:`~forge.recipes.output.claim_output_dir`:
    writable, room for a checkpoint, locked for this run) and released at the end, also on
    an error or Ctrl-C.

    Args:
        preset: from :func:`forge.load_preset`.
        overwrite: allow writing into a non-empty output directory.
        resume: True to continue from the newest checkpoint in the output directory, or a
            checkpoint path.
        doctor: run the pre-flight checks first (:func:`forge.recipes.doctor.preflight`): a
            FAIL stops the run before the model loads; the results go into ``doctor.json``.
        callbacks: more ``TrainerCallback``s for this run (``forge sweep`` prunes with one).

    Returns:
        A :class:`TrainResult` with the output directory and the final metrics.

    Raises:
        ForgeError: any mistake in the preset, the data or the paths, in one line.
        ForgeFault: the disk filled up (the run can be resumed once there is room).
    """
    config = RunConfig.from_preset(preset)
    check_launch(config.training_args, config.features)
    output_dir = config.training_args.output_dir
    config.trackers = trackers_inside(config.trackers, output_dir)
    need = checkpoint_bytes(config) if is_main_process() else None
    with claim_output_dir(output_dir, overwrite, bool(resume), need):
        _check_resume(output_dir, resume)
        checks = None
        if doctor:
            from forge.recipes.doctor import preflight

            # Before --overwrite clears anything: a run the checks stop loses nothing.
            checks = preflight(config)
        if overwrite and not resume and is_main_process():
            removed = clear_previous_run(output_dir)
            if removed:
                note(f"--overwrite: removed the previous run's {', '.join(removed)} from {output_dir}")
        trainer = _build(config, resume)
        for callback in callbacks:
            trainer.add_callback(callback)
        if trainer.args.resume_from_checkpoint:
            note(f"resuming from {trainer.args.resume_from_checkpoint}")
        if trainer.is_world_process_zero():
            # Written first, so a run that crashes can be resumed with `forge train --resume CKPT`.
            write_preset_file(config.preset_yaml, output_dir)
            write_run_file(output_dir, trainer.args.resume_from_checkpoint)
            if checks is not None:
                from forge.doctor import write_checks

                write_checks(checks, output_dir)
        try:
            result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
            save_final_model(trainer, output_dir)
            if trainer.is_world_process_zero():
                if (config.peft is not None and changes_base(config.peft)
                        and adapter_base(config.model.name_or_path) is None):
                    save_as_lora(trainer.model, output_dir)
                write_preset_file(config.preset_yaml, output_dir)
                # The loss curve and metrics, in the Trainer's own format, for reports and tests.
                state = json.dumps(dataclasses.asdict(trainer.state), indent=2, sort_keys=True)
                atomic_write_text(Path(output_dir, STATE_FILE), state + "\n")
        except Exception as err:
            if not is_disk_full(err):
                raise
            raise _disk_full_mid_run(err, trainer) from None
    return TrainResult(output_dir=output_dir, metrics=dict(result.metrics),
                       log_history=list(trainer.state.log_history), trainer=trainer)


def _check_resume(output_dir: str, resume: bool | str) -> None:
    """A checkpoint to resume from exists, is complete, and its files can be read back."""
    if resume is True:
        found = get_last_checkpoint(output_dir)
        if found is None:
            raise ForgeError(f"--resume: no complete checkpoint-* directory in '{output_dir}'")
        check_resumable(found)
    elif isinstance(resume, str):
        if not Path(resume).is_dir():
            raise ForgeError(f"--resume: checkpoint '{resume}' not found")
        if not is_complete(resume, unmarked_up_to=unmarked_up_to(Path(resume).parent)):
            raise ForgeError(f"--resume: checkpoint '{resume}' is incomplete (an interrupted save?)")
        check_resumable(resume)


def _disk_full_mid_run(err: BaseException, trainer: Any) -> ForgeError:
    """A full disk during training, in plain words: where, and how to go on from there."""
    args = trainer.args
    where = getattr(err, "filename", None) or checkpoint_dir(args, trainer.state.global_step)
    if not Path(where).exists():
        where = args.output_dir
    last = get_last_checkpoint(args.output_dir)
    then = (f"free some space, then `forge train --resume --output-dir {args.output_dir}` "
            f"continues from {Path(last).name}" if last else
            "free some space and run again (no checkpoint was complete yet)")
    return disk_full(where, then)


def get_last_checkpoint(output_dir: str) -> str | None:
    """The newest complete ``checkpoint-N`` directory in ``output_dir``, or None."""
    return last_complete_checkpoint(output_dir)
