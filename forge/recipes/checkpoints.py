"""Checkpoint completeness: a checkpoint half-written when a run was killed is never resumed.

The Trainer writes a checkpoint in several steps (weights, optimizer, RNG state, trainer
state, then every callback's ``on_save``: forge's EMA, monitor and schedule files). A kill
in between leaves a ``checkpoint-N`` directory that looks like the newest one. forge marks a
checkpoint complete only after everything else has been written, and resumes from the
newest complete one.

Two things make the marker trustworthy whatever transformers deletes:

* the run directory records that the run writes markers (``forge_run.json``), so a run whose
  only checkpoint is unmarked (its first save was cut short) is not mistaken for a run of an
  older forge, which wrote none (those still resume, judged by their ``trainer_state.json``);
* forge, not the Trainer, deletes old checkpoints past ``save_total_limit``, after the new
  one is marked: the Trainer deletes them before the callbacks run, so with
  ``save_total_limit: 1`` a kill there would leave no complete checkpoint at all.

Example:
    >>> trainer = Trainer(..., callbacks=[EMACallback(), CheckpointCompleteCallback()])
    >>> trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from forge.core.distributed import barrier
from forge.core.io import write_json
from forge.core.paths import STATE_FILE, checkpoint_dir
from forge.errors import ForgeError

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "forge_checkpoint_complete.json"
#: Written at the start of a run: which completion-marker scheme its checkpoints follow.
RUN_FILE = "forge_run.json"
MARKER_SCHEME = 1
#: "Every checkpoint unmarked": a run of a forge that wrote no markers.
NO_MARKERS = 2**62
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def is_checkpoint_name(name: str) -> bool:
    """Whether a directory name is the Trainer's ``checkpoint-N``."""
    return bool(_CHECKPOINT.match(name))


class CheckpointCompleteCallback(TrainerCallback):
    """Writes :data:`COMPLETE_MARKER` into each checkpoint once it is fully saved, then
    deletes checkpoints past ``save_total_limit`` (which it takes over from the Trainer).

    Put it last in the Trainer's callbacks, so that it runs after every other ``on_save``
    (``forge train`` does).
    """

    #: Kept last by :func:`forge.core.figures.put_ahead_of_trackers` when features reorder.
    runs_last = True

    def __init__(self) -> None:
        self.save_total_limit: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # The Trainer rotates before on_save, i.e. before the new checkpoint is marked.
        if args.save_total_limit is not None:
            self.save_total_limit, args.save_total_limit = args.save_total_limit, None
        return control

    def on_save(self, args, state, control, **kwargs):
        # Every rank writes its part of a checkpoint (FSDP/ZeRO shards, RNG states, forge's
        # files); the marker may only follow once all of them have finished.
        barrier()
        if state.is_world_process_zero:
            checkpoint = Path(checkpoint_dir(args, state.global_step))
            if checkpoint.is_dir():
                write_json({"global_step": state.global_step}, checkpoint / COMPLETE_MARKER)
                self._rotate(args, state)
        return control

    def _rotate(self, args, state) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        if self.save_total_limit:
            rotate_checkpoints(output_dir=args.output_dir, save_total_limit=self.save_total_limit,
                               best_model_checkpoint=state.best_model_checkpoint, use_mtime=True)

    def on_train_end(self, args, state, control, **kwargs):
        limit, self.save_total_limit = self.save_total_limit, None
        if limit is None:
            return control
        args.save_total_limit = limit
        best = state.best_model_checkpoint
        if state.is_world_process_zero and limit == 1 and best is not None:
            import shutil

            # What the Trainer does at the end with a limit of 1: keep only the best one.
            for path in checkpoints(args.output_dir):
                if not os.path.samefile(path, best):
                    shutil.rmtree(path, ignore_errors=True)
        return control


def _state_is_readable(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _step(checkpoint: Path) -> int:
    match = _CHECKPOINT.match(checkpoint.name)
    return int(match.group(1)) if match else NO_MARKERS  # renamed: never judged without a marker


def is_complete(checkpoint: str | Path, marked_run: bool = True,
                unmarked_up_to: int | None = None) -> bool:
    """Whether a checkpoint can be resumed from.

    Args:
        checkpoint: a ``checkpoint-N`` directory.
        marked_run: the run writes completion markers (a ``forge train`` run). For a run
            that never did, a readable ``trainer_state.json`` (written last by the Trainer
            itself) is the best evidence there is.
        unmarked_up_to: instead of ``marked_run``, the step up to which checkpoints carry
            no marker (see :func:`unmarked_up_to`).
    """
    path = Path(checkpoint)
    if (path / COMPLETE_MARKER).is_file():
        return True
    if unmarked_up_to is None:
        unmarked_up_to = -1 if marked_run else NO_MARKERS
    return _step(path) <= unmarked_up_to and _state_is_readable(path)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` directories in ``output_dir``, newest (highest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def unmarked_up_to(output_dir: str | Path) -> int:
    """The step up to which the checkpoints in ``output_dir`` are judged without a marker.

    -1 for a forge run (``forge_run.json`` says so, or a checkpoint carries a marker): every
    checkpoint needs its marker; :data:`NO_MARKERS` for a run of an older forge; the step it
    was resumed from for such a run continued by this one.
    """
    try:
        run = json.loads(Path(output_dir, RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        run = None
    if isinstance(run, dict) and isinstance(run.get("checkpoint_markers"), int):
        up_to = run.get("unmarked_up_to_step")
        return int(up_to) if isinstance(up_to, int) and up_to > 0 else -1
    return -1 if writes_markers(output_dir) else NO_MARKERS


def writes_markers(output_dir: str | Path) -> bool:
    """Whether the run in ``output_dir`` marks its checkpoints (any one carries a marker)."""
    return any((p / COMPLETE_MARKER).is_file() for p in checkpoints(output_dir))


def write_run_file(output_dir: str | Path, resumed_from: str | None = None) -> None:
    """Record that this run's checkpoints carry completion markers (:data:`RUN_FILE`).

    A run that continues a run of an older forge (no markers anywhere) records the step it
    resumed from: checkpoints up to that step keep being judged the old way.

    Example:
        >>> write_run_file("outputs/run")
    """
    path = Path(output_dir, RUN_FILE)
    if path.is_file():
        return
    up_to, resumed = 0, Path(resumed_from) if resumed_from else None
    if resumed is not None and resumed.resolve().parent == Path(output_dir).resolve() \
            and unmarked_up_to(output_dir) == NO_MARKERS:
        up_to = _step(resumed)
    write_json({"checkpoint_markers": MARKER_SCHEME, "unmarked_up_to_step": up_to}, path)


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint in ``output_dir`` (None if there is none).

    Newer, incomplete ones are skipped with a warning naming them.
    """
    up_to = unmarked_up_to(output_dir)
    skipped = []
    for checkpoint in checkpoints(output_dir):
        if is_complete(checkpoint, unmarked_up_to=up_to):
            if skipped:
                logger.warning("skipping incomplete checkpoint(s) %s (an interrupted save?); "
                               "resuming from %s", ", ".join(p.name for p in skipped),
                               checkpoint.name)
            return str(checkpoint)
        skipped.append(checkpoint)
    return None


def save_final_model(trainer: Any, output_dir: str) -> None:
    """``trainer.save_model(output_dir)``, always leaving loadable weights behind.

    With FSDP's ``SHARDED_STATE_DICT`` (the right choice for checkpoints of a large model) the
    Trainer's ``save_model`` writes only distributed shards, so the output directory got no
    ``model.safetensors`` and no config. The final model is saved with a full state dict
    (gathered to rank 0) instead; checkpoints stay sharded.
    """
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    kind = str(getattr(plugin, "state_dict_type", "")) if plugin is not None else ""
    if "SHARDED_STATE_DICT" not in kind:
        trainer.save_model(output_dir)
        return
    previous = plugin.state_dict_type
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        trainer.save_model(output_dir)
    finally:
        plugin.set_state_dict_type(previous)


def check_resumable(checkpoint: str | Path) -> None:
    """Refuse, in one line naming the file, a checkpoint whose files cannot be read back.

    A marked checkpoint is complete, but a disk can corrupt it later (or a user edit it):
    the Trainer would stop with a JSON or zip traceback half-way into loading it.

    Raises:
        ForgeError: ``trainer_state.json`` or a forge state file is not valid JSON, a
            safetensors file is cut short, or a torch file is not a readable archive.
    """
    import zipfile

    from forge.recipes.space import read_safetensors_header

    path = Path(checkpoint)
    hint = "; remove that checkpoint to resume from the one before"
    for file in sorted(path.iterdir()):
        if file.suffix == ".json":
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise ForgeError(f"{file}: corrupt, not valid JSON ({_first(err)}){hint}") from None
        elif file.suffix == ".safetensors":
            read_safetensors_header(file, hint=hint)
        elif file.suffix in (".pt", ".pth", ".bin") and zipfile.is_zipfile(file) is False:
            raise ForgeError(f"{file}: corrupt or cut short (not a readable torch archive){hint}")
    if not (path / STATE_FILE).is_file():
        raise ForgeError(f"{path}: no {STATE_FILE}; it is not a complete checkpoint{hint}")


def _first(err: Any) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
