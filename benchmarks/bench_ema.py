"""Time one EMA update of a ~50M-parameter Llama: forge against its peers and the bandwidth floor.

    python benchmarks/bench_ema.py                 # CPU
    python benchmarks/bench_ema.py --device cuda   # adds the card's copy bandwidth for reference

Rows (all float32, decay 0.999, every tensor updated every call):

* floor: a bare ``torch._foreach_lerp_`` over prebuilt lists, the least work any EMA can do
  (read the EMA and the weights, write the EMA);
* forge ``EMAWeights.update``;
* a per-parameter Python loop (``ema.mul_(d).add_(p, alpha=1 - d)``, the common hand-written one);
* timm ``ModelEmaV3`` (loaded straight from timm's file when ``import timm`` fails, e.g. when
  torchvision is missing or broken);
* ema-pytorch ``EMA`` with ``use_foreach=True`` (its fastest setting) and with its defaults.

Rows are interleaved (shuffled each round), so a noisy shared machine penalises them alike; the
ratio to the floor is computed within each round and its median over rounds reported, which
stays stable on a loaded machine where absolute times do not. Peers that are not installed
are skipped with a note.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

DECAY = 0.999


def build_model(device: str, small: bool = False) -> torch.nn.Module:
    """The ~50M-parameter Llama; ``small`` keeps its 57 tensors but shrinks them ~400x."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512 if small else 16000,
        hidden_size=40 if small else 640,
        intermediate_size=108 if small else 1728,
        num_hidden_layers=6,
        num_attention_heads=10,
        num_key_value_heads=10,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device)


def load_timm_ema() -> type | None:
    """timm's ``ModelEmaV3``; from its source file if the package will not import."""
    try:
        from timm.utils.model_ema import ModelEmaV3

        return ModelEmaV3
    except Exception:  # noqa: BLE001 - any import failure means "load the file directly"
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(spec.submodule_search_locations[0], "utils", "model_ema.py")
        module_spec = importlib.util.spec_from_file_location("timm_model_ema", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)  # the file needs only torch
        return module.ModelEmaV3


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def make_rows(model: torch.nn.Module) -> tuple[dict[str, Callable[[], None]], list[str]]:
    """Each row is a zero-argument update; also returns notes on skipped peers."""
    from forge.ema import EMAWeights

    params = [p for p in model.parameters() if p.requires_grad]
    rows: dict[str, Callable[[], None]] = {}
    notes: list[str] = []

    floor_ema = [p.detach().clone() for p in params]

    @torch.no_grad()  # like every row: an EMA is not part of the autograd graph
    def floor() -> None:
        torch._foreach_lerp_(floor_ema, params, 1 - DECAY)

    rows["floor: bare torch._foreach_lerp_"] = floor

    forge_ema = EMAWeights(model, decay=DECAY)
    rows["forge EMAWeights.update"] = lambda: forge_ema.update(model)

    loop_ema = [p.detach().clone() for p in params]

    def per_param_loop() -> None:
        with torch.no_grad():
            for e, p in zip(loop_ema, params, strict=True):
                e.mul_(DECAY).add_(p.detach(), alpha=1 - DECAY)

    rows["per-parameter loop (mul_/add_)"] = per_param_loop

    timm_cls = load_timm_ema()
    if timm_cls is None:
        notes.append("timm not installed: ModelEmaV3 row skipped")
    else:
        timm_ema = timm_cls(model, decay=DECAY)
        rows[f"timm {package_version('timm')} ModelEmaV3"] = lambda: timm_ema.update(model)

    try:
        from ema_pytorch import EMA
    except ImportError:
        notes.append("ema-pytorch not installed: its rows skipped")
    else:
        version = package_version("ema-pytorch")
        for label, foreach in (
            (f"ema-pytorch {version} (use_foreach=True)", True),
            (f"ema-pytorch {version} (defaults)", False),
        ):
            peer = EMA(model, beta=DECAY, update_after_step=0, update_every=1, use_foreach=foreach)
            peer.update()  # its first call only copies the weights in
            peer.update()
            rows[label] = peer.update
    return rows, notes


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_rows(rows: dict[str, Callable[[], None]], device: str, rounds: int, calls: int) -> dict[str, list[float]]:
    """Seconds per update for every round; rows interleaved in a shuffled order each round, each
    warmed by one untimed call just before its sample so no row inherits another's cache state."""
    samples: dict[str, list[float]] = {name: [] for name in rows}
    order = list(rows)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn = rows[name]
            fn()
            sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) / calls)
    return samples


def copy_bandwidth(nbytes: int, device: str, rounds: int) -> float:
    """Bytes/s of a plain device copy of ``nbytes`` (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--calls", type=int, default=3, help="updates per timed sample")
    cli = parser.parse_args()

    if cli.threads:
        torch.set_num_threads(cli.threads)
    cpu = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{datetime.date.today()}, torch {torch.__version__}, {cpu}, {os.cpu_count()} CPUs, {threads} threads, "
        f"load average {load:.1f} at start"
    )
    # The ~50M model measures memory traffic; the small one (same 57 tensors, ~400x fewer
    # parameters) exposes each implementation's fixed per-call cost, which is what separates
    # them on a GPU, where the traffic itself takes ~100x less time than here.
    for small in (False, True):
        model = build_model(cli.device, small=small)
        rows, notes = make_rows(model)
        with torch.no_grad():  # keep the weights off any fixed point the rows could exploit
            for p in model.parameters():
                p.add_(1e-3)
        samples = time_rows(rows, cli.device, cli.rounds, cli.calls * (50 if small else 1))
        report(model, samples, notes, cli, small)


def report(model: torch.nn.Module, samples: dict[str, list[float]], notes: list[str], cli, small: bool) -> None:
    """Print one markdown table: median (and best) time per update, ratio to the floor."""
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = sum(1 for _ in model.parameters())
    floor_name = "floor: bare torch._foreach_lerp_"
    median = {name: statistics.median(s) for name, s in samples.items()}
    # Ratio to the floor taken within each round, then the median over rounds: rows of one round
    # run back to back, so load from other processes largely cancels out of the ratio.
    ratio = {
        name: statistics.median(a / b for a, b in zip(s, samples[floor_name], strict=True))
        for name, s in samples.items()
    }
    moved = 3 * 4 * n_params  # read EMA + read weights + write EMA, float32
    title = "per-call overhead" if small else "memory-bound"
    print(f"\nEMA update ({title}), {n_params / 1e6:.2f}M float32 parameters in {n_tensors} tensors, {cli.device}")
    for note in notes:
        print(f"note: {note}")
    unit, scale = ("us", 1e6) if small else ("ms", 1e3)
    print(f"\n| implementation | {unit} / update (median) | x floor (paired median) | GB/s | {unit} (best) |")
    print("|---|---:|---:|---:|---:|")
    for name in sorted(samples, key=lambda n: ratio[n]):
        best = min(samples[name])
        gbs = moved / median[name] / 1e9
        print(f"| {name} | {median[name] * scale:.2f} | {ratio[name]:.2f} | {gbs:.1f} | {best * scale:.2f} |")
    if cli.device == "cuda" and not small:
        bandwidth = copy_bandwidth(4 * n_params, cli.device, cli.rounds)
        forge = min(samples["forge EMAWeights.update"])
        print(
            f"\ndevice copy bandwidth {bandwidth / 1e9:.0f} GB/s; forge reaches {moved / forge / bandwidth:.0%} of it"
        )


if __name__ == "__main__":
    main()
