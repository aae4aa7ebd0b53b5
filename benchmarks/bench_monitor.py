"""Step time of a tiny Llama under a bare Trainer, with GradientMonitor, and with wandb.watch.

Run (CPU; a few minutes per model on 2 shared cores)::

    python benchmarks/bench_monitor.py --model demo
    python benchmarks/bench_monitor.py --model 6.6m --rows bare monitor monitor-warn

Every row is a ``transformers.Trainer`` that logs every optimizer step (``logging_steps=1``):

* ``bare``: nothing else attached;
* ``monitor``: ``GradientMonitor()`` with its defaults (``on_nonfinite="skip"``, so one small
  row is copied to the host per step to decide before the update; per-block norms on every
  step, since every step is a logging step, update/weight ratios and zero fractions once per
  ``detail_every`` = 10 steps);
* ``monitor-warn``: ``GradientMonitor`` with every policy ``warn`` (one copy per log);
* ``wandb``: ``wandb.watch(model, log="all", log_freq=1)`` in an offline run.

``--model demo`` is forge's builtin tiny Llama (what ``forge train demo`` trains), ``6.6m`` a
6.6M-parameter Llama (vocabulary 8192, hidden 256, 4 layers). Time per step is wall-clock time
(``--clock wall``, the default) from one ``on_step_begin`` to the next, so it includes the
logging that follows each step; ``--clock cpu`` counts CPU seconds of the process and its
children instead, which other jobs on a shared machine do not stretch. Rows run interleaved
for ``--rounds`` rounds, in reverse order every other round (drift then hits every row alike);
the first ``--warmup`` steps of each run are dropped. "vs bare" is the median over rounds of
each round's median step time against the bare row's of the same round.

The monitor's rows also show the CPU time spent inside its own code per step (its callback
events, the recording before clipping, the token-counting hook): the work it adds, measured
directly, as a share of the bare step.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil
import torch
from datasets import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

ROWS = ["bare", "monitor", "monitor-warn", "wandb"]


def cpu_seconds(children: list) -> float:
    """CPU time of this process and the given child processes (user + system)."""
    total = time.process_time()
    for child in children:
        with contextlib.suppress(psutil.Error):  # a child that has exited no longer counts
            times = child.cpu_times()
            total += times.user + times.system
    return total


class StepClock(TrainerCallback):
    """Time between consecutive ``on_step_begin`` events: a whole step, logging included.

    ``cpu`` counts CPU seconds of this process and its children (wandb writes from a service
    process), which other jobs on a shared machine do not inflate; ``wall`` counts elapsed time.
    """

    def __init__(self, clock: str):
        self.clock = clock
        self.children: list = []
        self.times: list[float] = []
        self._last: float | None = None

    def _now(self) -> float:
        return time.perf_counter() if self.clock == "wall" else cpu_seconds(self.children)

    def on_train_begin(self, args, state, control, **kwargs):
        self.children = psutil.Process().children(recursive=True)

    def on_step_begin(self, args, state, control, **kwargs):
        now = self._now()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now

    def on_train_end(self, args, state, control, **kwargs):
        if self._last is not None:
            self.times.append(self._now() - self._last)


class InsideClock:
    """CPU seconds spent inside a GradientMonitor's per-step code: its events, the clip-time
    recording and the token-counting hook (outermost calls only, so nothing counts twice).

    End-to-end step times on a shared machine wobble by several percent between runs; this is
    the work the monitor adds, measured directly.
    """

    METHODS = ("on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end",
               "on_log", "_record", "_count")

    def __init__(self, monitor) -> None:
        self.seconds, self._depth = 0.0, 0
        for name in self.METHODS:
            setattr(monitor, name, self._timed(getattr(monitor, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            self._depth += 1
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.process_time() - start

        return timed


# The two sizes: forge's demo model (builtin:tiny-llama) and a 6.6M-parameter Llama.
MODELS = {
    "demo": None,
    "6.6m": dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}
MODEL = "6.6m"


def make_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    if MODELS[MODEL] is None:
        from forge.demo import builtin_model_dir

        config = LlamaConfig.from_pretrained(builtin_model_dir("tiny-llama"))
    else:
        config = LlamaConfig(**MODELS[MODEL])
    return LlamaForCausalLM(config)


def run_row(row: str, steps: int, batch: int, seq: int, out: str, clock: str,
            logging_steps: int = 1) -> tuple[list[float], float | None]:
    """Step times of one run, and the monitor's own CPU seconds per step (None without it)."""
    from forge.monitor import GradientMonitor

    model = make_model()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (steps * batch, seq), generator=gen).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    timer = StepClock(clock)
    callbacks: list[TrainerCallback] = [timer]
    run, inside = None, None
    if row.startswith("monitor"):
        monitor = GradientMonitor(on_nonfinite="warn" if row == "monitor-warn" else "skip")
        inside = InsideClock(monitor)
        callbacks.append(monitor)
    elif row == "wandb":
        import wandb

        run = wandb.init(mode="offline", dir=out, project="forge-bench", reinit="finish_previous")
        wandb.watch(model, log="all", log_freq=1)
    args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=batch,
                             logging_steps=logging_steps, report_to="none", save_strategy="no",
                             disable_tqdm=True, dataloader_pin_memory=False, learning_rate=1e-4)
    Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    if run is not None:
        import wandb

        wandb.unwatch(model)
        run.finish()
    return timer.times, None if inside is None else inside.seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--logging-steps", type=int, default=1,
                        help="the Trainer's logging_steps (the issue's target is 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is steadiest on a shared machine)")
    parser.add_argument("--model", choices=sorted(MODELS), default="6.6m",
                        help="demo: forge's builtin tiny Llama; 6.6m: a 6.6M-parameter Llama")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="wall",
                        help="cpu: CPU seconds of this process and its children (robust to "
                             "other jobs on the machine); wall: elapsed time")
    cli = parser.parse_args()
    global MODEL
    MODEL = cli.model
    torch.set_num_threads(cli.threads)
    hf_logging.set_verbosity_error()  # the Trainer's per-step log lines are not what we time

    times: dict[str, list[float]] = {row: [] for row in cli.rows}
    medians: dict[str, list[float]] = {row: [] for row in cli.rows}  # one per round
    inside: dict[str, list[float]] = {row: [] for row in cli.rows}
    with tempfile.TemporaryDirectory() as out:
        for rnd in range(cli.rounds):
            for row in cli.rows if rnd % 2 == 0 else cli.rows[::-1]:
                # Keep end-of-run tables and log dicts out of the report.
                with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                    step_times, own = run_row(row, cli.steps, cli.batch, cli.seq,
                                              os.path.join(out, f"{row}-{rnd}"), cli.clock,
                                              cli.logging_steps)
                if own is not None:
                    inside[row].append(own)
                times[row].extend(step_times[cli.warmup:])
                medians[row].append(statistics.median(step_times[cli.warmup:]))
                print(f"round {rnd + 1}/{cli.rounds} {row:<13} median {1000 * medians[row][-1]:.1f} ms",
                      file=sys.stderr)

    n_params = sum(p.numel() for p in make_model().parameters())
    print(f"\n{cli.model} Llama, {n_params / 1e6:.1f}M parameters, batch {cli.batch} x seq {cli.seq}, "
          f"{cli.threads} thread(s), logging_steps={cli.logging_steps}, {cli.clock} time, "
          f"{cli.rounds} rounds x {cli.steps - cli.warmup} steps\n")
    base = statistics.median(times["bare"]) if "bare" in times else None
    print("| setup | step time, median (ms) | vs bare, median of rounds (min..max) | "
          "inside forge per step (ms) | inside forge vs bare step |")
    print("|---|---:|---:|---:|---:|")
    labels = {"bare": "bare Trainer", "monitor": "GradientMonitor (defaults: skip policy)",
              "monitor-warn": "GradientMonitor (all policies warn)",
              "wandb": 'wandb.watch(log="all", log_freq=1), offline'}
    for row in cli.rows:
        med = statistics.median(times[row])
        over = "-"
        if base is not None and row != "bare":
            ratios = [100 * (m / b - 1) for m, b in zip(medians[row], medians["bare"])]
            over = f"{statistics.median(ratios):+.1f}% ({min(ratios):+.1f}..{max(ratios):+.1f})"
        own = statistics.median(inside[row]) if inside[row] else None
        own_ms = "-" if own is None else f"{1000 * own:.2f}"
        own_pct = "-" if own is None or base is None else f"{100 * own / base:.1f}%"
        print(f"| {labels[row]} | {1000 * med:.1f} | {over} | {own_ms} | {own_pct} |")

if __name__ == "__main__":
    main()
