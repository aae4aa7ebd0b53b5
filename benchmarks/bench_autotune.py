"""Batch-size search: forge's autotune against the retry-on-OOM searches people use today.

Run (CPU, about a minute on 2 shared cores; GPU rows are added when CUDA is available)::

    python benchmarks/bench_autotune.py
    python benchmarks/bench_autotune.py --budgets 16MB 64MB --start 256

Every method runs real training steps of a tiny Llama (forward, backward, AdamW step) and is
judged by the same memory oracle, so the comparison is about the search, not the hardware:

* ``forge``: :func:`forge.autotune.autotune_batch_size` (fit, refine, confirm, back-off);
* ``x0.9 from N``: what ``TrainingArguments(auto_find_batch_size=True)`` runs (accelerate's
  ``find_executable_batch_size``): start at the per-device batch, multiply by 0.9 after
  every out-of-memory error, keep the first batch that runs;
* ``halving from N``: the classic variant, halve after every failure;
* ``lightning binsearch``: Lightning's ``BatchSizeFinder(mode="binsearch")``: double from 2
  until a failure, then bisect, 3 steps per trial.

On the CPU the oracle is forge's accounting measurement (bytes a step keeps alive) against
``--budgets``; a step over budget counts as an out-of-memory failure. A failed trial is run to
the end of its step here, while a real OOM aborts part-way, so the baselines' times are upper
bounds; ``examples`` (examples pushed through the model while searching) is the
hardware-independent cost. The true maximum is found by bisection with the oracle, untimed.
On a GPU (``--gpu``, default when CUDA is available) the real Trainer with
``auto_find_batch_size`` is compared with forge on real out-of-memory errors.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from forge.autotune import autotune_batch_size  # noqa: E402
from forge.autotune.data import parse_memory  # noqa: E402
from forge.autotune.probe import StepProbe  # noqa: E402


def make_model(vocab: int = 256, hidden: int = 64, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class Oracle:
    """Runs one real step per call and says whether it fit; counts trials and examples."""

    def __init__(self, probe: Callable[[int], int | None], budget: int, steps_per_trial: int = 1):
        self.probe, self.budget, self.steps = probe, budget, steps_per_trial
        self.trials = self.failures = self.examples = 0

    def measure(self, batch: int) -> int | None:
        """One trial of one step; its peak bytes (None: out of memory), counted."""
        self.trials += 1
        self.examples += batch
        peak = self.probe(batch)
        self.failures += peak is None or peak > self.budget
        return peak

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
    """Largest batch that fits, by bisection (memory grows with the batch)."""
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
        best = true_max(probe, budget, hi=start)
        methods: dict[str, Callable[[Oracle], int]] = {
            "forge": lambda o: autotune_batch_size(model, max_memory=o.budget, seq_len=seq, max_batch=4 * start,
                                                    measure=o.measure).per_device_train_batch_size,
            f"x0.9 from {start} (auto_find_batch_size)": lambda o: shrink_on_failure(o, start, 0.9),
            f"halving from {start}": lambda o: shrink_on_failure(o, start, 0.5),
            "lightning binsearch (3 steps/trial)": lightning_binsearch,
        }
        for name, run in methods.items():
            oracle = Oracle(probe, budget, steps_per_trial=3 if "lightning" in name else 1)
            began = time.perf_counter()
            found = run(oracle)
            rows.append({"budget": text, "seq": seq, "method": name, "trials": oracle.trials,
                         "failed": oracle.failures, "examples": oracle.examples,
                         "seconds": time.perf_counter() - began, "found": found, "max": best,
                         "global_kept": name == "forge"})
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
    probe = StepProbe(ours.model, seq, mode="cuda", autocast_dtype=torch.bfloat16)
    best = true_max(probe, result.budget + result.reserved, hi=start)
    for row in rows:
        row["max"] = best
    return rows


def table(rows: list[dict]) -> str:
    head = ("| budget | seq | method | trials | failed | examples | time to decide | batch found "
            "| true max | found / max | global batch kept |\n|" + " --- |" * 11)
    lines = [head]
    for r in rows:
        share = f"{r['found'] / r['max']:.0%}" if r["max"] else "-"
        lines.append(f"| {r['budget']} | {r['seq']} | {r['method']} | {r['trials']} | {r['failed']} | "
                     f"{r['examples'] if r['examples'] is not None else '-'} | {r['seconds']:.2f} s | "
                     f"{r['found']} | {r['max'] or '-'} | {share} | {'yes' if r['global_kept'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["8MB", "32MB", "128MB"])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--start", type=int, default=512, help="starting batch of the retry searches")
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
