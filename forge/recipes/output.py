"""The run's output directory: claimed before anything loads, refused when it holds something
else, cleared of an earlier run with ``--overwrite``, and given the resolved preset first
(``forge train --resume`` reads it).

Claiming (:func:`claim_output_dir`) checks, on rank 0 only, that the directory can be written,
that its disk has room for one checkpoint (:mod:`forge.recipes.space`), and takes the run's
lock (:class:`RunLock`): a second run on the same directory fails at once naming the first
one's pid, instead of both printing "saved" while one of them is lost.

Example:
    >>> with claim_output_dir("outputs/run", overwrite=False, resume=False):
    ...     trainer.train()
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from forge.core.io import atomic_write_text, disk_full, is_disk_full
from forge.core.paths import DOCTOR_FILE, PRESET_FILE
from forge.errors import ForgeError
from forge.recipes.checkpoints import COMPLETE_MARKER, RUN_FILE, is_checkpoint_name

#: Held for the whole run: ``{"pid": ..., "host": ...}`` of the run holding it.
LOCK_FILE = "forge.lock"

# What a previous forge run leaves in its output directory (besides the tokenizer files the
# next save overwrites anyway). `--overwrite` removes these, so that nothing of the old run
# (its checkpoints, monitor summary, weights of another kind) mixes into the new one.
RUN_FILES = ("trainer_state.json", "monitor_summary.json", "autotune.json", "all_results.json",
             "train_results.json", "eval_results.json", "training_args.bin", "config.json",
             "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "adapter_model.safetensors", "adapter_config.json", "ema.safetensors", PRESET_FILE,
             # the freeze schedule's record of its changes (forge/layers/schedule.py)
             "forge_gradual_unfreezing.json", "forge_lp_lora.json", "forge_lisa.json", DOCTOR_FILE, RUN_FILE)
RUN_DIRS = ("report", "runs", "adapter_init")


def _entries(path: Path) -> list[Path]:
    """What a directory holds, a run's lock left by a killed run aside."""
    return [p for p in path.iterdir() if p.name != LOCK_FILE]


def written_by_forge(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` holds a forge run (or only checkpoints): nothing of the user's
    that resuming there could overwrite."""
    path = Path(output_dir)
    if (path / PRESET_FILE).is_file() or (path / RUN_FILE).is_file():
        return True
    entries = _entries(path)
    checkpoints = [p for p in entries if p.is_dir() and is_checkpoint_name(p.name)]
    return any((p / COMPLETE_MARKER).is_file() for p in checkpoints) or len(checkpoints) == len(entries)


def check_output_dir(output_dir: str, overwrite: bool, resume: bool) -> None:
    """Refuse to write into a non-empty directory unless told to; resume only a forge run."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ForgeError(f"output directory '{output_dir}' is a file")
    if not path.is_dir() or not _entries(path):
        return
    if resume and not overwrite and not written_by_forge(path):
        raise ForgeError(
            f"--resume: output directory '{output_dir}' holds files forge did not write (no "
            f"{PRESET_FILE}); resuming there would overwrite them: choose another --output-dir")
    if not (overwrite or resume):
        raise ForgeError(
            f"output directory '{output_dir}' exists and is not empty; pass --overwrite to "
            "write into it, --resume to continue its run, or choose another --output-dir"
        )


class RunLock:
    """An exclusive lock on an output directory for one run: ``forge.lock``, flock-ed.

    The kernel drops the lock when its process dies (even by SIGKILL), so a lock file whose
    lock can be taken is stale: it is taken over with a note naming the dead holder.

    Example:
        >>> lock = RunLock("outputs/run").acquire()
        >>> lock.release()
    """

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise a ForgeError naming the run that holds it."""
        import fcntl

        from forge.core.console import note

        for _ in range(5):  # retried only if a finishing run removed the file under us
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise ForgeError(
                    f"output directory '{self.path.parent}' is in use by another forge run "
                    f"({holder}); wait for it to finish or choose another --output-dir") from None
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            stale = _holder(fd, default="")
            if stale:
                note(f"taking over the lock of {self.path.parent}: {stale} no longer runs there "
                     "(killed?)")
            try:
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename}).encode())
            except OSError as err:
                os.close(fd)
                if is_disk_full(err):
                    raise disk_full(self.path) from None
                raise
            self._fd = fd
            return self
        raise ForgeError(f"output directory '{self.path.parent}': could not take {LOCK_FILE}")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if is_disk_full(err):
                raise disk_full(self.path.parent) from None
            raise ForgeError(f"output directory '{self.path.parent}' is not writable "
                             f"({err.strerror})") from None

    def release(self) -> None:
        """Give the lock up and remove the file (idempotent)."""
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _holder(fd: int, default: str = "pid unknown") -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
        pid, host = int(data["pid"]), str(data.get("host", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return default
    here = os.uname().nodename
    return f"pid {pid}" + (f" on {host}" if host and host != here else "")


class OutputClaim:
    """What :func:`claim_output_dir` holds: the lock, and the directories it had to create
    (removed again when the run ends before writing anything into them)."""

    def __init__(self, lock: RunLock | None, created: list[Path]):
        self.lock = lock
        self.created = created

    def release(self) -> None:
        """Unlock; remove the directories the claim created if they are still empty."""
        if self.lock is not None:
            self.lock.release()
        for path in reversed(self.created):
            try:
                path.rmdir()  # only succeeds while empty
            except OSError:
                break

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _make_dirs(path: Path) -> list[Path]:
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    created = []
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        except OSError as err:
            for made in reversed(created):
                made.rmdir()
            if is_disk_full(err):
                raise disk_full(directory) from None
            raise ForgeError(f"cannot create output directory '{path}': {err.strerror}") from None
        created.append(directory)
    return created


def claim_output_dir(output_dir: str, overwrite: bool, resume: bool,
                     checkpoint_bytes: int | None = None) -> OutputClaim:
    """Check and claim the output directory for a run, before anything heavy loads.

    Every rank checks that the directory may be written (:func:`check_output_dir`); rank 0
    alone creates it, takes its :class:`RunLock` and checks the disk has room for one
    checkpoint (other ranks must not race it for the lock).

    Args:
        output_dir: the run's directory.
        overwrite, resume: ``--overwrite`` / ``--resume`` were given.
        checkpoint_bytes: what one checkpoint needs (:func:`forge.recipes.space.checkpoint_bytes`);
            None skips the free-space check.

    Returns:
        An :class:`OutputClaim`; release it when the run ends (also on errors).

    Raises:
        ForgeError: the directory holds something else, is not writable, is in use by
            another run; ForgeFault: the disk is full.
    """
    from forge.core.distributed import is_main_process

    check_output_dir(output_dir, overwrite, resume)
    if not is_main_process():
        return OutputClaim(None, [])
    path = Path(output_dir)
    created = _make_dirs(path)
    claim = OutputClaim(RunLock(path), created)
    try:
        claim.lock.acquire()
        if checkpoint_bytes:
            import shutil

            free = shutil.disk_usage(path).free
            if free < checkpoint_bytes:
                raise ForgeError(
                    f"output directory '{output_dir}': {_mb(free)} free on its disk, but one "
                    f"checkpoint of this model needs about {_mb(checkpoint_bytes)}; free some "
                    "space or choose another --output-dir")
    except BaseException:
        claim.release()
        raise
    return claim


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def clear_previous_run(output_dir: str) -> list[str]:
    """Remove what an earlier forge run wrote into ``output_dir`` (``--overwrite``).

    Only a directory forge wrote (it holds ``forge_preset.yaml``) is cleared, and only of
    forge's and the Trainer's own outputs; any other file stays. Returns what was removed.
    """
    import shutil

    import yaml

    from forge.core.safeyaml import load_yaml

    root = Path(output_dir)
    preset_file = root / PRESET_FILE
    if not preset_file.is_file():
        return []
    names = set(RUN_FILES)
    try:  # the old run may have written its monitor summary under another name
        old = load_yaml(preset_file.read_text(encoding="utf-8"), str(preset_file)) or {}
        summary = (old.get("monitor") or {}).get("summary_file") if isinstance(old, dict) else None
        if isinstance(summary, str) and "/" not in summary and summary not in ("", ".", ".."):
            names.add(summary)
    except (OSError, ValueError, yaml.YAMLError, AttributeError, ForgeError):
        pass
    removed = []
    for entry in sorted(root.iterdir()):
        is_run_dir = entry.is_dir() and (entry.name in RUN_DIRS or is_checkpoint_name(entry.name))
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


def trackers_inside(specs: list[Any], output_dir: str) -> list[Any]:
    """Tracker specs with relative paths taken inside the output directory.

    A relative TensorBoard ``logging_dir`` or local MLflow ``tracking_uri`` in a preset means
    a place in the run's own directory, as ``monitor.summary_file`` does; an absolute one
    (accepted from the command line only, see :data:`forge.config.outputs.OUTPUT_PATHS`)
    stays where it points.
    """
    import dataclasses

    from forge.config.outputs import escapes, local_path

    out = []
    for spec in specs:
        logging_dir = getattr(spec, "logging_dir", None)
        uri = getattr(spec, "tracking_uri", None)
        if logging_dir and not escapes(logging_dir):
            spec = dataclasses.replace(spec, logging_dir=os.path.join(output_dir, logging_dir))
        path = local_path("trackers.mlflow.tracking_uri", uri) if uri else None
        if path and not escapes(path):
            prefix = uri[: len(uri) - len(path)]
            spec = dataclasses.replace(spec, tracking_uri=prefix + os.path.join(output_dir, path))
        out.append(spec)
    return out
