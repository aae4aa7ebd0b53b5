"""Names of the files forge writes, defined once (the runner, trackers, report and features
all read them), and where the Trainer puts a checkpoint."""

from __future__ import annotations

import os
from typing import Any

#: The resolved preset in a run's output directory (``forge train --resume`` reads it back).
PRESET_FILE = "forge_preset.yaml"
#: The Trainer's own state: loss curve and metrics (also written into every checkpoint).
STATE_FILE = "trainer_state.json"
#: The pre-flight checks of ``forge doctor`` / the start of ``forge train`` (``forge report`` shows them).
DOCTOR_FILE = "doctor.json"
#: What transformers names checkpoint folders: ``checkpoint-<global step>``.
CHECKPOINT_PREFIX = "checkpoint"


def checkpoint_dir(args: Any, global_step: int) -> str:
    """The folder the Trainer writes for ``global_step`` under ``args.output_dir``."""
    return os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{global_step}")
