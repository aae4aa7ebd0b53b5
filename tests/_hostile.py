"""Builders for the bad-input corpus (tests/test_bad_input.py): hostile YAML, broken model
directories, run directories with corrupt files, special files (a FIFO, a device)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

SFT_ROW = {"prompt": "What is 2 plus 2?", "completion": "4."}


def jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def bomb(levels: int = 9, width: int = 9, flow: bool = False) -> str:
    """A "billion laughs": anchors `a`..`i`, each aliasing the one before `width` times.

    Block form: a mapping of anchors, the last one named `*i`-ready; flow form: one flow list
    whose last element expands to width**levels strings (for `--set KEY=...`).
    """
    names = [chr(ord("a") + i) for i in range(levels)]
    first = "[" + ", ".join(["lol"] * width) + "]"
    if flow:
        items = [f"&{names[0]} {first}"]
        items += [f"&{n} [" + ", ".join([f"*{p}"] * width) + "]" for p, n in zip(names, names[1:])]
        return "[" + ", ".join(items) + "]"
    lines = [f"{names[0]}: &{names[0]} {first}"]
    lines += [f"{n}: &{n} [" + ", ".join([f"*{p}"] * width) + "]" for p, n in zip(names, names[1:])]
    return "\n".join(lines) + "\n"


def bomb_preset(where: str) -> str:
    """A preset whose `where` (``description`` or ``section.key``) is a billion laughs.

    The anchors sit in a key forge does not know (so they would also be reported, formatted,
    if the budget did not stop the document first).
    """
    anchors = "".join("  " + line + "\n" for line in bomb().splitlines())
    section, _, key = where.partition(".")
    body = f"{section}:\n  {key}: *i\n" if key else f"{section}: *i\n"
    return "extends: demo\nlaughs:\n" + anchors + body


class Fifo:
    """A named pipe at this path: reading it would block until someone writes."""

    def __call__(self, path: Path) -> None:
        os.mkfifo(path)


class Link:
    """A symbolic link at this path pointing at ``target``."""

    def __init__(self, target: str):
        self.target = target

    def __call__(self, path: Path) -> None:
        os.symlink(self.target, path)


class Gz:
    """The gzip of ``data`` (cut to ``keep`` bytes to make a truncated stream)."""

    def __init__(self, data: bytes, keep: int | None = None):
        self.data, self.keep = data, keep

    def __call__(self, path: Path) -> None:
        packed = gzip.compress(self.data)
        path.write_bytes(packed[: self.keep] if self.keep else packed)


def builtin_model() -> Path:
    from forge.demo import builtin_model_dir

    return builtin_model_dir()


class Model:
    """A copy of the builtin tiny model directory with one thing broken by ``breaks(dir)``."""

    def __init__(self, breaks):
        self.breaks = breaks

    def __call__(self, path: Path) -> None:
        shutil.copytree(builtin_model(), path)
        self.breaks(path)


def cut_weights(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def garbage_weights(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\0" * 100)


def empty_weights(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"")


def bad_header_weights(d: Path) -> None:
    data = bytearray((d / "model.safetensors").read_bytes())
    data[8:12] = b"!!!!"  # the JSON header's first bytes
    (d / "model.safetensors").write_bytes(bytes(data))


def config_edit(**changes):
    def edit(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config.update(changes)
        (d / "config.json").write_text(json.dumps(config))
    return edit


def config_text(data: bytes):
    def edit(d: Path) -> None:
        (d / "config.json").write_bytes(data)
    return edit


def tokenizer_text(data: bytes):
    def edit(d: Path) -> None:
        (d / "tokenizer.json").write_bytes(data)
    return edit


def pickled_weights(d: Path) -> None:
    """Weights as a pickle that would run a command when unpickled without weights_only."""
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {d.parent / 'PWNED'}",))

    (d / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload()}, d / "pytorch_model.bin")


def run_dir(checkpoint_files: dict[str, bytes | str], marked: bool = True):
    """A forge run directory with one checkpoint-2 holding ``checkpoint_files``."""
    def make(path: Path) -> None:
        ckpt = path / "checkpoint-2"
        ckpt.mkdir(parents=True)
        (path / "forge_preset.yaml").write_text("extends: demo\n")
        (path / "forge_run.json").write_text('{"checkpoint_markers": 1, "unmarked_up_to_step": 0}')
        files = {"trainer_state.json": '{"global_step": 2, "log_history": []}',
                 **({"forge_checkpoint_complete.json": '{"global_step": 2}'} if marked else {}),
                 **checkpoint_files}
        for name, data in files.items():
            if data is None:
                continue
            target = ckpt / name
            target.write_bytes(data) if isinstance(data, bytes) else target.write_text(data)
    return make


def saved_dataset_without_train_split(path: Path) -> None:
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list([SFT_ROW])}).save_to_disk(str(path))


def report_dir(state: str | bytes | None = '{"global_step": 1, "log_history": []}',
               monitor: str | None = None, checkpoint_state: str | None = None):
    """A run directory for `forge report` with the given (possibly broken) files."""
    def make(path: Path) -> None:
        path.mkdir(parents=True)
        if state is not None:
            target = path / "trainer_state.json"
            target.write_bytes(state) if isinstance(state, bytes) else target.write_text(state)
        if monitor is not None:
            (path / "monitor_summary.json").write_text(monitor)
        if checkpoint_state is not None:
            (path / "checkpoint-2").mkdir()
            (path / "checkpoint-2" / "trainer_state.json").write_text(checkpoint_state)
    return make
