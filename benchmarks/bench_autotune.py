"""Batch-size search: forge's autotune against the retry-on-OOM searches people use today.

Run (CPU, a few minutes on 2 shared cores; GPU rows are added when CUDA is available)::

    python benchmarks/bench_autotune.py
    python benchmarks/bench_autotune.py --budgets 96MB 192MB --start 256

Every method runs real training steps of a Llama with a large vocabulary over a small hidden
size (vocabulary 8192, hidden 64: the logits' backward transients are half the peak):

* ``forge``: :func:`forge.autotune.autotune_batch_size` (fit, refine, confirm, back-off);
* ``x0.9 from N``: what ``TrainingArguments(auto_find_batch_size=True)`` runs (accelerate's
  ``find_executable_batch_size``): start at the per-device batch, multiply by 0.9 after
  every out-of-memory error, keep the first batch that runs;
* ``halving from N``: the classic variant, halve after every failure;
* ``lightning binsearch``: Lightning's ``BatchSizeFinder(mode="binsearch")``: double from 2
  until a failure, then bisect, 3 steps per trial.

The CPU has no out-of-memory errors to react to, so a trial "fails" when the step's measured
peak (forge's memory model, the live-tensor high-water mark of a real step) exceeds the
budget. Every method is then judged by an independent oracle: the peak RSS growth of a fresh
process training the same model at the batch it found (``tests/_memory_oracle.py``), which
also gives the true largest batch (the oracle is run on a bracket of batches around the
crossing, side by side). A failed trial runs to the end of its step here, while a real OOM
aborts part-way, so the baselines' times are upper bounds; ``examples`` (examples pushed
through the model while searching) is the hardware-independent cost. On a GPU (``--gpu``,
default when CUDA is available) the real Trainer with ``auto_find_batch_size`` is compared
with forge on real out-of-memory errors.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from forge.autotune import autotune_batch_size  # noqa: E402
from forge.autotune.data import parse_memory  # noqa: E402
from forge.autotune.probe import StepProbe  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _memory_oracle import rss_growth  # noqa: E402


def model_config(vocab: int = 8192, hidden: int = 64, layers: int = 2) -> dict:
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024}


def make_model(seed: int = 0, **kwargs) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**model_config(**kwargs)))


class FreshProcess:
    """The oracle: does a batch fit the budget in a fresh process? (peak RSS growth, cached)"""

    def __init__(self, config: dict, seq: int, budget: int):
        self.config, self.seq, self.budget = config, seq, budget
        self.growth: dict[int, int] = {}

    def measure(self, batches: list[int]) -> None:
        todo = sorted({b for b in batches if b > 0 and b not in self.growth})
        for i in range(0, len(todo), 4):  # four interpreters side by side
            chunk = todo[i:i + 4]
            specs = [{"config": self.config, "batch": b, "seq": self.seq} for b in chunk]
            self.growth.update(zip(chunk, rss_growth(specs)))

    def fits(self, batch: int) -> bool:
        self.measure([batch])
        return self.growth[batch] <= self.budget

    def true_max(self, guess: int) -> int:
        """The largest batch that fits: a bracket around ``guess``, widened until it holds the crossing."""
        lo, hi = max(1, guess - 3), guess + 3
        while True:
            self.measure(list(range(lo, hi + 1)))
            fitting = [b for b in range(lo, hi + 1) if self.growth[b] <= self.budget]
            if not fitting and lo > 1:
                lo, hi = max(1, lo - 8), lo
            elif fitting and max(fitting) == hi:
                lo, hi = hi, hi + 8
            else:
                return max(fitting, default=0)


class Oracle:
    """The simulated device: runs one real step per call and says whether it fit (its measured
    peak within the budget); counts trials and examples."""

    def __init__(self, probe: StepProbe, budget: int, steps_per_trial: int = 1):
        self.probe, self.budget, self.steps = probe, budget, steps_per_trial
        self.trials = self.failures = self.examples = 0

    def measure(self, batch: int) -> tuple[int, int] | None:
        """One trial of one step: (peak, forward/backward peak) bytes (None: out of memory), counted."""
        self.trials += 1
        self.examples += batch
        found = self.probe.measure(batch)
        self.failures += found is None or found[0] > self.budget
        return found

    def fits(self, batch: int) -> bool:
        """One trial of ``steps_per_trial`` steps (stopping at the first failure)."""
        self.trials += 1
        for _ in range(self.steps):
            self.examples += batch
            peak = self.probe(batch)
            if peak is None or peak > self.budget:
                self.failures += 1
                return False
        return True


def true_max(probe: Callable[[int], int | None], budget: int, hi: int) -> int:
    """Largest batch that fits, by bisection with real out-of-memory errors (GPU rows)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        peak = probe(mid)
        if peak is not None and peak <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def shrink_on_failure(oracle: Oracle, start: int, factor: float) -> int:
    batch = start
    while batch > 0 and not oracle.fits(batch):
        batch = int(batch * factor)
    return batch


def lightning_binsearch(oracle: Oracle, init: int = 2, max_trials: int = 25) -> int:
    """Lightning's ``_run_binary_scaling``: double until a failure, then bisect."""
    low, high, size, best = 1, None, init, 0
    for _ in range(max_trials):
        if oracle.fits(size):
            best = size
            if high is not None and high - low <= 1:
                break
            low = size
            size = (low + high) // 2 if high is not None else size * 2
        else:
            high = size
            size = (low + high) // 2
            if high - low <= 1:
                break
    return best


def cpu_rows(budgets: list[str], seq: int, start: int) -> list[dict]:
    model = make_model()
    probe = StepProbe(model, seq)
    rows = []
    for text in budgets:
        budget = parse_memory(text)
        methods: dict[str, Callable[[Oracle], int]] = {
            "forge": lambda o: autotune_batch_size(model, max_memory=o.budget, seq_len=seq, max_batch=4 * start,
                                                    measure=o.measure).per_device_train_batch_size,
            f"x0.9 from {start} (auto_find_batch_size)": lambda o: shrink_on_failure(o, start, 0.9),
            f"halving from {start}": lambda o: shrink_on_failure(o, start, 0.5),
            "lightning binsearch (3 steps/trial)": lightning_binsearch,
        }
        found_rows = []
        for name, run in methods.items():
            oracle = Oracle(probe, budget, steps_per_trial=3 if "lightning" in name else 1)
            began = time.perf_counter()
            found = run(oracle)
            found_rows.append({"budget": text, "seq": seq, "method": name, "trials": oracle.trials,
                               "failed": oracle.failures, "examples": oracle.examples,
                               "seconds": time.perf_counter() - began, "found": found,
                               "global_kept": name == "forge"})
        fresh = FreshProcess(model_config(), seq, budget)
        best = fresh.true_max(max(r["found"] for r in found_rows))
        fresh.measure([r["found"] for r in found_rows])
        for row in found_rows:
            row["max"] = best
            row["fits"] = fresh.fits(row["found"]) if row["found"] else True
        rows += found_rows
    return rows


def gpu_rows(seq: int, start: int) -> list[dict]:
    """Real Trainer(auto_find_batch_size=True) vs forge on one GPU, real OOMs (CUDA only)."""
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Attempts(TrainerCallback):
        def __init__(self):
            self.count = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.count += 1

    def trainer(auto: bool) -> tuple[Trainer, Attempts]:
        model = make_model(vocab=32000, hidden=1024, layers=8).cuda()
        ids = torch.randint(0, 32000, (4 * start, seq)).tolist()
        data = [{"input_ids": row, "labels": row} for row in ids]
        args = TrainingArguments(tempfile.mkdtemp(), per_device_train_batch_size=start, max_steps=1,
                                 auto_find_batch_size=auto, bf16=True, report_to="none",
                                 save_strategy="no", disable_tqdm=True)
        attempts = Attempts()
        return Trainer(model=model, args=args, train_dataset=data, callbacks=[attempts]), attempts

    rows = []
    hf, attempts = trainer(auto=True)
    began = time.perf_counter()
    hf.train()
    rows.append({"budget": "GPU free", "seq": seq, "method": f"Trainer auto_find_batch_size from {start}",
                 "trials": attempts.count, "failed": attempts.count - 1, "examples": None,
                 "seconds": time.perf_counter() - began, "found": hf._train_batch_size, "max": None,
                 "global_kept": False})
    del hf
    torch.cuda.empty_cache()
    ours, _ = trainer(auto=False)
    result = autotune_batch_size(ours, target_global_batch=start)
    rows.append({"budget": "GPU free", "seq": seq, "method": "forge", "trials": len(result.probes),
                 "failed": sum(not p.ok for p in result.probes), "examples": sum(p.batch_size for p in result.probes),
                 "seconds": result.seconds, "found": result.max_per_device, "max": None, "global_kept": True})
    # The true maximum: bisection with real out-of-memory errors, untimed.
    probe = StepProbe(ours.model, seq, autocast_dtype=torch.bfloat16)
    best = true_max(probe, result.budget + result.reserved, hi=start)
    for row in rows:
        row["max"] = best
    return rows


def table(rows: list[dict]) -> str:
    head = ("| budget | seq | method | trials | failed | examples | time to decide | batch found "
            "| fits (fresh process) | true max (fresh process) | found / max | global batch kept |\n|"
            + " --- |" * 12)
    lines = [head]
    for r in rows:
        share = f"{r['found'] / r['max']:.0%}" if r["max"] else "-"
        fits = {True: "yes", False: "**no**", None: "-"}[r.get("fits")]
        lines.append(f"| {r['budget']} | {r['seq']} | {r['method']} | {r['trials']} | {r['failed']} | "
                     f"{r['examples'] if r['examples'] is not None else '-'} | {r['seconds']:.2f} s | "
                     f"{r['found']} | {fits} | {r['max'] or '-'} | {share} | "
                     f"{'yes' if r['global_kept'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["96MB", "192MB", "384MB"])
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--start", type=int, default=256, help="starting batch of the retry searches")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    rows = cpu_rows(cli.budgets, cli.seq, cli.start)
    if cli.gpu:
        rows += gpu_rows(seq=1024, start=256)
    print(f"# bench_autotune: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{cli.threads} thread(s)")
    print(table(rows))


if __name__ == "__main__":
    main()
