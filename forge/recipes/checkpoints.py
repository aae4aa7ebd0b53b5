"""Checkpoint completeness: a checkpoint half-written when a run was killed is never resumed.

The Trainer writes a checkpoint in several steps (weights, optimizer, RNG state, trainer
state, then every callback's ``on_save``: forge's EMA, monitor and schedule files). A kill
in between leaves a ``checkpoint-N`` directory that looks like the newest one. forge marks a
checkpoint complete only after everything else has been written, and resumes from the
newest complete one.

Example:
    >>> trainer = Trainer(..., callbacks=[EMACallback(), CheckpointCompleteCallback()])
    >>> trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from forge.core.distributed import barrier
from forge.core.paths import checkpoint_dir

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "forge_checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointCompleteCallback(TrainerCallback):
    """Writes :data:`COMPLETE_MARKER` into each checkpoint once it is fully saved.

    Put it last in the Trainer's callbacks, so that it runs after every other ``on_save``
    (``forge train`` does).
    """

    def on_save(self, args, state, control, **kwargs):
        # Every rank writes its part of a checkpoint (FSDP/ZeRO shards, RNG states, forge's
        # files); the marker may only follow once all of them have finished.
        barrier()
        if state.is_world_process_zero:
            checkpoint = Path(checkpoint_dir(args, state.global_step))
            if checkpoint.is_dir():
                marker = {"global_step": state.global_step}
                (checkpoint / COMPLETE_MARKER).write_text(json.dumps(marker), encoding="utf-8")
        return control


def _state_is_readable(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def is_complete(checkpoint: str | Path, marked_run: bool = True) -> bool:
    """Whether a checkpoint can be resumed from.

    Args:
        checkpoint: a ``checkpoint-N`` directory.
        marked_run: the run writes completion markers (a ``forge train`` run). For a run
            that never did, a readable ``trainer_state.json`` (written last by the Trainer
            itself) is the best evidence there is.
    """
    path = Path(checkpoint)
    if marked_run:
        return (path / COMPLETE_MARKER).is_file()
    return _state_is_readable(path)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` directories in ``output_dir``, newest (highest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def writes_markers(output_dir: str | Path) -> bool:
    """Whether the run in ``output_dir`` marks its checkpoints (any one carries a marker)."""
    return any((p / COMPLETE_MARKER).is_file() for p in checkpoints(output_dir))


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint in ``output_dir`` (None if there is none).

    Newer, incomplete ones are skipped with a warning naming them.
    """
    marked_run = writes_markers(output_dir)
    skipped = []
    for checkpoint in checkpoints(output_dir):
        if is_complete(checkpoint, marked_run):
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
