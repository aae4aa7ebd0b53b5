"""What a run directory holds, read once: the Trainer's log history (final state and
checkpoints merged), the monitor's summary, the freeze schedule's record and the resolved preset."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge.core.paths import PRESET_FILE, STATE_FILE
from forge.errors import ForgeError

MONITOR_FILE = "monitor_summary.json"


@dataclass
class RunFiles:
    """What a run directory holds, read once.

    Attributes:
        run_dir: the directory.
        log_history: the Trainer's log entries, merged over the final state and checkpoints.
        sources: the files ``log_history`` came from.
        monitor: the gradient monitor's summary, or None.
        preset_yaml: the resolved preset (secrets redacted), or None.
        state: the newest ``trainer_state.json`` minus its log history.
        schedules: the freeze schedules' records (``forge_<kind>.json``: kind, config, history
            of changes), from the run directory, else from its newest checkpoint.
    """

    run_dir: Path
    log_history: list[dict[str, Any]]
    sources: list[str]
    monitor: dict[str, Any] | None = None
    preset_yaml: str | None = None
    state: dict[str, Any] = field(default_factory=dict)
    schedules: list[dict[str, Any]] = field(default_factory=list)


_MAX_FILE_BYTES = 512 * 2**20  # a run's JSON files are kB to a few MB


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            raise ForgeError(f"cannot read '{path}': {path.stat().st_size} bytes is more than a "
                             "run file can be")
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ForgeError(f"cannot read '{path}': not UTF-8 text (byte {err.start})") from None
    except (OSError, ValueError) as err:
        raise ForgeError(f"cannot read '{path}': {err}") from None
    except RecursionError:
        raise ForgeError(f"cannot read '{path}': JSON nested too deeply") from None


def _objects(path: Path, data: dict[str, Any], key: str, step: bool = False) -> list[dict[str, Any]]:
    """``data[key]`` checked to be a list of JSON objects (each with a numeric ``step``)."""
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ForgeError(f"{path}: '{key}' should be a list, got {type(value).__name__}")
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise ForgeError(f"{path}: {key}[{i}] should be an object, got {type(entry).__name__}")
        number = entry.get("step")
        if step and (isinstance(number, bool) or not isinstance(number, (int, float))):
            raise ForgeError(f"{path}: {key}[{i}] has no numeric 'step'")
    return value


def _object(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ForgeError(f"{path}: should be a JSON object, got {type(data).__name__}")
    return data


def _read_monitor(path: Path) -> dict[str, Any]:
    data = _object(path)
    _objects(path, data, "history", step=True)
    for key in ("events", "anomalies"):
        _objects(path, data, key)
    if not isinstance(data.get("skipped_steps", []), list):
        raise ForgeError(f"{path}: 'skipped_steps' should be a list")
    return data


def load_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory: merged log history, monitor summary and preset.

    Checkpoint states come first (oldest step first) and the final ``trainer_state.json``
    last; an entry logged again later (same step, same keys, e.g. after a resume) replaces the
    earlier one, so a crashed run without a final state still has its checkpoints' history.

    Raises:
        ForgeError: no such directory, or no trainer state in it.

    Example:
        >>> load_run("outputs/demo").log_history[0]["loss"]  # doctest: +SKIP
        6.02
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ForgeError(f"run directory '{run_dir}' not found")

    def ckpt_step(path: Path) -> int:
        tail = path.parent.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    paths = sorted(root.glob(f"checkpoint-*/{STATE_FILE}"), key=ckpt_step)
    if (root / STATE_FILE).is_file():
        paths.append(root / STATE_FILE)
    if not paths:
        raise ForgeError(f"'{run_dir}' has no {STATE_FILE} (nor checkpoint-*/{STATE_FILE}); "
                         "is it the output directory of `forge train`?")
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    state: dict[str, Any] = {}
    for path in paths:
        data = _object(path)
        for entry in _objects(path, data, "log_history", step=True):
            merged[(entry.get("step"), tuple(sorted(entry)))] = entry
        state = {k: v for k, v in data.items() if k != "log_history"}
    history = sorted(merged.values(), key=lambda e: e.get("step") or 0)  # stable within a step
    monitor = _read_monitor(root / MONITOR_FILE) if (root / MONITOR_FILE).is_file() else None
    preset = None
    if (root / PRESET_FILE).is_file():
        from forge.trackers.redact import redact_yaml

        try:
            preset = redact_yaml((root / PRESET_FILE).read_text(encoding="utf-8", errors="replace"))
        except (OSError, ForgeError):
            preset = None  # the report is about the curves; a broken preset file only loses its box
    sources = [str(p.relative_to(root)) for p in paths]
    return RunFiles(root, history, sources, monitor, preset, state, _schedules(root, paths))


def _schedules(root: Path, state_paths: list[Path]) -> list[dict[str, Any]]:
    """Freeze-schedule records: the run's own (written at the end), else the newest checkpoint's."""
    for folder in [root, *(p.parent for p in reversed(state_paths) if p.parent != root)]:
        found = []
        for path in sorted(folder.glob("forge_*.json")):
            record = _read_json(path)
            if isinstance(record, dict) and "kind" in record and isinstance(record.get("history"), list):
                found.append(record)
        if found:
            return found
    return []
