"""The bad-input corpus: every mistake a user can make in a preset, a data file, a model
directory, a run directory or the command line, and what a hostile preset or run file tries,
gives one `forge: error:` line naming the culprit, exit code 2, no traceback, no hang, and
leaves every file as it was (nothing outside the run directory changes, nothing is written).

Each case is (id, files to create, argv after `forge`, a fragment the message must hold).
A file is text, bytes, or a builder from tests/_hostile.py (a FIFO, a broken model copy, ...).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import pytest
from _hostile import (
    SFT_ROW,
    Fifo,
    Gz,
    Link,
    Model,
    bad_header_weights,
    bomb,
    bomb_preset,
    config_edit,
    config_text,
    cut_weights,
    empty_weights,
    garbage_weights,
    jsonl,
    pickled_weights,
    report_dir,
    run_dir,
    saved_dataset_without_train_split,
    tokenizer_text,
)

from forge import cli

# (case id, files to create {name: text}, argv after `forge`, expected message fragment)
CASES = [
    ("malformed-yaml", {"p.yaml": "training:\n  seed: [1\n"}, ["train", "p.yaml"], "p.yaml: line"),
    ("yaml-not-mapping", {"p.yaml": "- 1\n"}, ["train", "p.yaml"], "must be a YAML mapping"),
    ("unknown-section", {"p.yaml": "trainer: {}\n"}, ["train", "p.yaml"],
     "trainer: unknown section (did you mean 'training'?)"),
    ("unknown-training-key", {"p.yaml": "extends: lora\ntraining:\n  lerning_rate: 1\n"},
     ["train", "p.yaml"], "training.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
    ("mistyped-value", {"p.yaml": "training:\n  max_steps: ten\n"}, ["train", "p.yaml"],
     "training.max_steps: expected int, got 'ten'"),
    ("bool-for-string", {"p.yaml": "model:\n  name_or_path: true\n"}, ["train", "p.yaml"],
     "model.name_or_path: expected str, got True"),
    ("extends-itself", {"p.yaml": "extends: ./p.yaml\n"}, ["train", "p.yaml"], "extends itself"),
    ("extends-missing", {"p.yaml": "extends: qlorra\n"}, ["train", "p.yaml"],
     "preset 'qlorra' not found"),
    ("extends-wrong-type", {"p.yaml": "extends: 3\n"}, ["train", "p.yaml"],
     "extends: expected a preset name or path"),
    ("unknown-preset", {}, ["train", "lorra"], "preset 'lorra' not found"),
    ("missing-preset-file", {}, ["train", "nope.yaml"], "preset 'nope.yaml' not found"),
    ("unknown-method", {}, ["train", "sft", "--set", "method=ppo"],
     "method: expected one of sft, dpo, orpo, cpo, kto, got 'ppo'"),
    ("bad-format-name", {}, ["train", "sft", "--set", "data.format=chatml"],
     "data.format: expected one of"),
    ("eval-fraction-range", {}, ["train", "sft", "--set", "data.eval_fraction=1.5"],
     "data.eval_fraction: expected a fraction between 0 and 1"),
    ("unknown-tracker", {}, ["train", "sft", "--set", "trackers=[tensorbord]"],
     "unknown tracker 'tensorbord'"),
    ("qlora-full-finetune", {}, ["train", "qlora", "--set", "peft=null"], "cannot be fully fine-tuned"),
    ("dpo-token-loss", {}, ["train", "dpo", "--set", "loss={strategy: focal}"],
     "the token-level loss applies to sft only"),
    ("dpo-freeze", {}, ["train", "dpo", "--set", "freeze={enabled: true, first: 1}"],
     "freezing blocks is not supported with dpo yet"),
    ("dpo-packing", {}, ["train", "dpo", "--set", "data.packing=true"], "packing applies to sft only"),
    ("moved-key", {}, ["train", "sft", "--set", "training.packing=true"],
     "training.packing: set data.packing instead"),
    ("quantization-key", {}, ["train", "qlora", "--set", "model.quantization.bits=4"],
     "model.quantization.bits: unknown key"),
    ("set-without-equals", {}, ["train", "sft", "--set", "training.seed"], "expected KEY=VALUE"),
    ("set-bad-yaml", {}, ["train", "sft", "--set", "training.seed=[1"], "the value is not valid YAML"),
    ("args-contradiction", {}, ["train", "sft", "--model", "builtin:tiny-llama",
                                "--set", "training.load_best_model_at_end=true",
                                "--set", "training.save_strategy=steps"], "training:"),
    ("missing-data", {}, ["train", "sft", "--data", "none.jsonl"], "data file 'none.jsonl' not found"),
    ("empty-data", {"d.jsonl": "\n"}, ["train", "sft", "--data", "d.jsonl"], "the data set is empty"),
    ("row-missing-field", {"d.jsonl": jsonl(SFT_ROW, {"prompt": "x"})},
     ["train", "sft", "--data", "d.jsonl"], "d.jsonl row 2: field 'completion' is missing or empty"),
    ("row-empty-field", {"d.jsonl": jsonl(SFT_ROW, SFT_ROW, {"prompt": "", "completion": "y"})},
     ["train", "sft", "--data", "d.jsonl"], "d.jsonl row 3: field 'prompt' is missing or empty"),
    ("row-not-text", {"d.jsonl": jsonl({"prompt": 3, "completion": "y"})},
     ["train", "sft", "--data", "d.jsonl"], "row 1: field 'prompt' must be text"),
    ("invalid-json-line", {"d.jsonl": jsonl(SFT_ROW) + "{broken\n"},
     ["train", "sft", "--data", "d.jsonl"], "d.jsonl row 2: invalid JSON"),
    ("bad-role", {"d.jsonl": jsonl({"messages": [{"role": "bot", "content": "x"}]})},
     ["train", "sft", "--data", "d.jsonl"], "row 1: messages[0] has unknown role 'bot'"),
    ("no-assistant", {"d.jsonl": jsonl({"messages": [{"role": "user", "content": "x"}]})},
     ["train", "sft", "--data", "d.jsonl"], "no assistant message"),
    ("unknown-columns", {"d.jsonl": jsonl({"question": "a", "answer": "b"})},
     ["train", "sft", "--data", "d.jsonl"], "cannot tell the data format"),
    ("wrong-dpo-columns", {"d.jsonl": jsonl(SFT_ROW)}, ["train", "dpo", "--data", "d.jsonl"],
     "method dpo needs prompt/chosen/rejected (or chosen/rejected) columns"),
    ("dpo-missing-rejected", {"d.jsonl": jsonl({"prompt": "p", "chosen": "c", "rejected": ""})},
     ["train", "dpo", "--data", "d.jsonl"], "row 1: field 'rejected' is missing or empty"),
    ("preference-data-for-sft", {"d.jsonl": jsonl({"prompt": "p", "chosen": "c", "rejected": "r"})},
     ["train", "sft", "--data", "d.jsonl"], "is for method dpo, not sft"),
    ("unsupported-extension", {"d.txt": "hello"}, ["train", "sft", "--data", "d.txt"],
     "unsupported data file type '.txt'"),
    ("not-a-saved-dataset", {"dir/readme.md": "x"}, ["train", "sft", "--data", "dir"],
     "not a directory saved by datasets"),
    ("unknown-builtin-data", {}, ["train", "sft", "--data", "builtin:demo"],
     "unknown builtin data set 'builtin:demo'"),
    ("missing-model-path", {}, ["train", "sft", "--model", "./models/none"],
     "model path './models/none' does not exist"),
    ("unknown-builtin-model", {}, ["train", "sft", "--model", "builtin:huge-llama"],
     "unknown builtin model 'builtin:huge-llama'"),
    ("output-dir-is-file", {"o": "x"}, ["train", "demo", "--output-dir", "o"], "is a file"),
    ("output-dir-not-empty", {"o/keep.txt": "mine"}, ["train", "demo", "--output-dir", "o"],
     "exists and is not empty"),
    ("resume-without-checkpoint", {}, ["train", "demo", "--resume", "--max-steps", "1"],
     "--resume: no complete checkpoint-* directory"),
]



MIB = 2**20
DEMO_PRESET = "extends: demo\n"


def preset(text: str) -> dict[str, str]:
    return {"p.yaml": DEMO_PRESET + text}


# A hostile or careless preset file: YAML bombs, tags, sizes, encodings, repeated keys.
YAML_CASES = [
    ("yaml-bomb-description", {"p.yaml": bomb_preset("description")}, ["train", "p.yaml"],
     "p.yaml: YAML aliases expand to more than"),
    ("yaml-bomb-model-name", {"p.yaml": bomb_preset("model.name_or_path")}, ["train", "p.yaml"],
     "YAML aliases expand to more than"),
    ("yaml-bomb-training-run-name", {"p.yaml": bomb_preset("training.run_name")},
     ["train", "p.yaml"], "YAML aliases expand to more than"),
    ("yaml-bomb-tracker-option", {"p.yaml": bomb_preset("trackers")}, ["train", "p.yaml"],
     "YAML aliases expand to more than"),
    ("yaml-bomb-in-parent", {"base.yaml": bomb_preset("description"),
                             "p.yaml": "extends: ./base.yaml\n"}, ["train", "p.yaml"],
     "base.yaml: YAML aliases expand to more than"),
    ("yaml-bomb-in-set", {}, ["train", "demo", "--set", f"description={bomb(flow=True)}"],
     "--set description: YAML aliases expand to more than"),
    ("yaml-bomb-in-set-model", {}, ["train", "demo", "--set", f"model.name_or_path={bomb(flow=True)}"],
     "--set model.name_or_path: YAML aliases expand"),
    ("yaml-bomb-in-presets-show", {}, ["presets", "show", "demo", "--set",
                                       f"description={bomb(flow=True)}"], "YAML aliases expand"),
    ("yaml-alias-cycle", preset("description: &a [1, *a]\n"), ["train", "p.yaml"],
     "a YAML alias refers to the value that contains it"),
    ("yaml-deep-flow", preset("description: " + "[" * 300 + "]" * 300 + "\n"), ["train", "p.yaml"],
     "YAML nested too deeply"),
    ("yaml-deep-block", {"p.yaml": "".join("  " * i + "a:\n" for i in range(250)) + "  " * 250 + "b\n"},
     ["train", "p.yaml"], "YAML nested too deeply"),
    ("yaml-deep-set", {}, ["train", "demo", "--set", "description=" + "[" * 300 + "]" * 300],
     "--set description: YAML nested too deeply"),
    ("yaml-too-large", preset("description: " + "x" * (300 * 1024) + "\n"), ["train", "p.yaml"],
     "is more than a preset can be"),
    ("yaml-key-twice", preset("training:\n  learning_rate: 1.0e-4\n  learning_rate: 1.0e-3\n"),
     ["train", "p.yaml"], "p.yaml: line 4: key 'learning_rate' is given twice (also on line 3)"),
    ("yaml-section-twice", preset("training: {}\ntraining: {}\n"), ["train", "p.yaml"],
     "key 'training' is given twice"),
    ("yaml-key-twice-in-set", {}, ["train", "demo", "--set", "ema={enabled: true, enabled: false}"],
     "--set ema: line 1: key 'enabled' is given twice"),
    ("yaml-python-object-tag", {"p.yaml": '!!python/object/apply:os.system ["touch PWNED"]\n'},
     ["train", "p.yaml"], "invalid YAML"),
    ("yaml-python-name-tag", preset("model: !!python/name:os.system\n"), ["train", "p.yaml"],
     "invalid YAML"),
    ("yaml-python-tag-in-set", {}, ["train", "demo", "--set", "description=!!python/object/apply:os.getcwd []"],
     "the value is not valid YAML"),
    ("yaml-binary-tag", preset("model:\n  name_or_path: !!binary aGVsbG8=\n"), ["train", "p.yaml"],
     "model.name_or_path: expected str, got b'hello'"),
    ("yaml-date-for-seed", preset("training:\n  seed: 2001-12-14\n"), ["train", "p.yaml"],
     "training.seed: expected int, got datetime.date(2001, 12, 14)"),
    ("yaml-5000-digit-int", preset("training:\n  seed: " + "9" * 5000 + "\n"), ["train", "p.yaml"],
     "p.yaml: invalid YAML: Exceeds the limit (4300 digits)"),
    ("yaml-tab-indent", preset("training:\n\tseed: 1\n"), ["train", "p.yaml"], "p.yaml: line 3"),
    ("yaml-not-utf8", {"p.yaml": b"description: caf\xe9\n"}, ["train", "p.yaml"],
     "p.yaml: not UTF-8 text (byte 16)"),
    ("yaml-utf16", {"p.yaml": "description: x\n".encode("utf-16")}, ["train", "p.yaml"],
     "p.yaml: not UTF-8 text"),
    ("yaml-surrogate-in-set", {}, ["train", "demo", "--set", "description=caf\udce9"],
     "--set description: not UTF-8 text"),
    ("yaml-scalar-document", {"p.yaml": "just words\n"}, ["train", "p.yaml"],
     "must be a YAML mapping, got str"),
    ("yaml-section-not-mapping", preset("training: 5\n"), ["train", "p.yaml"],
     "training: expected a mapping, got int"),
    ("yaml-number-key", preset("training:\n  1: 2\n"), ["train", "p.yaml"], "training.1: unknown key"),
    ("yaml-huge-value-is-cut-in-message", preset("model:\n  name_or_path: [" + "1, " * 20000 + "1]\n"),
     ["train", "p.yaml"], "model.name_or_path: expected str, got [1, 1, 1, 1, 1, 1, ...]"),
    ("preset-is-a-directory", {"presetdir/x": "x"}, ["train", "presetdir"], "preset 'presetdir' not found"),
    ("preset-is-a-fifo", {"pipe.yaml": Fifo()}, ["train", "pipe.yaml"], "preset 'pipe.yaml' not found"),
    ("preset-is-dev-zero", {}, ["train", "/dev/zero"], "preset '/dev/zero' not found"),
    ("extends-a-fifo", {"pipe.yaml": Fifo(), "p.yaml": "extends: ./pipe.yaml\n"}, ["train", "p.yaml"],
     "extends: preset './pipe.yaml' not found"),
    ("extends-dev-zero", {"p.yaml": "extends: /dev/zero\n"}, ["train", "p.yaml"],
     "extends: preset '/dev/zero' not found"),
    ("extends-cycle-of-two", {"a.yaml": "extends: ./b.yaml\n", "b.yaml": "extends: ./a.yaml\n"},
     ["train", "a.yaml"], "extends itself (a.yaml -> b.yaml -> a.yaml)"),
    ("extends-a-list", {"p.yaml": "extends: [lora, sft]\n"}, ["train", "p.yaml"],
     "extends: expected a preset name or path"),
]

# Paths a preset file names for forge to write: only inside the output directory.
PATH_CASES = [
    ("summary-file-parent", {"victim.json": '{"mine": true}',
                             **preset("monitor:\n  enabled: true\n  summary_file: ../victim.json\n")},
     ["train", "p.yaml"], "p.yaml: monitor.summary_file: '../victim.json' is outside the output directory"),
    ("summary-file-absolute", preset("monitor:\n  enabled: true\n  summary_file: /etc/forge-victim.json\n"),
     ["train", "p.yaml"], "monitor.summary_file: '/etc/forge-victim.json' is outside the output directory"),
    ("summary-file-home", preset("monitor:\n  enabled: true\n  summary_file: ~/.bashrc\n"),
     ["train", "p.yaml"], "is outside the output directory"),
    ("summary-file-sneaky", preset("monitor:\n  enabled: true\n  summary_file: a/../../victim.json\n"),
     ["train", "p.yaml"], "is outside the output directory"),
    ("tensorboard-dir-parent", preset("trackers:\n  tensorboard:\n    logging_dir: ../tb\n"),
     ["train", "p.yaml"], "trackers.tensorboard.logging_dir: '../tb' is outside the output directory"),
    ("tensorboard-dir-absolute", preset("trackers:\n  tensorboard:\n    logging_dir: /tmp/forge-tb\n"),
     ["train", "p.yaml"], "give this path with --set to write elsewhere"),
    ("tensorboard-dir-in-list-form", preset("trackers: [{tensorboard: {logging_dir: /tmp/tb}}]\n"),
     ["train", "p.yaml"], "p.yaml: trackers.tensorboard.logging_dir"),
    ("mlflow-file-uri", preset("trackers:\n  mlflow:\n    tracking_uri: file:///etc/mlruns\n"),
     ["train", "p.yaml"], "trackers.mlflow.tracking_uri: 'file:///etc/mlruns' is outside"),
    ("mlflow-sqlite-parent", preset("trackers:\n  mlflow:\n    tracking_uri: sqlite:///../x.db\n"),
     ["train", "p.yaml"], "trackers.mlflow.tracking_uri: 'sqlite:///../x.db' is outside"),
    ("mlflow-absolute-path", preset("trackers:\n  mlflow:\n    tracking_uri: /var/mlruns\n"),
     ["train", "p.yaml"], "is outside the output directory"),
]

# Numbers: every key with a meaningful range, non-finite values, wrong sources blamed.
NUMBER_CASES = [
    ("lr-inf-set", {}, ["train", "demo", "--set", "training.learning_rate=.inf"],
     "--set: training.learning_rate: expected a finite number, got inf"),
    ("lr-nan-file", preset("training:\n  learning_rate: .nan\n"), ["train", "p.yaml"],
     "p.yaml: training.learning_rate: expected a finite number, got nan"),
    ("weight-decay-nan", preset("training:\n  weight_decay: .nan\n"), ["train", "p.yaml"],
     "training.weight_decay: expected a finite number"),
    ("lr-negative", {}, ["train", "demo", "--set", "training.learning_rate=-1"],
     "training.learning_rate: expected a value in [0, inf), got -1"),
    ("lr-too-many-digits", preset("training:\n  learning_rate: 1" + "0" * 30 + "\n"),
     ["train", "p.yaml"], "training.learning_rate: expected a number that fits in 64 bits"),
    ("seed-too-large", {}, ["train", "demo", "--set", "training.seed=99999999999"],
     "training.seed: expected a value in [0, 4294967295], got 99999999999"),
    ("seed-negative", {}, ["train", "demo", "--set", "training.seed=-3"], "training.seed: expected"),
    ("data-seed-too-large", {}, ["train", "demo", "--set", "training.data_seed=4294967296"],
     "training.data_seed: expected a value in [0, 4294967295]"),
    ("max-steps-zero", {}, ["train", "demo", "--max-steps", "0"],
     "training.max_steps: expected -1 (use epochs) or >= 1, got 0"),
    ("max-steps-negative", {}, ["train", "demo", "--max-steps", "-5"], "expected -1 (use epochs) or >= 1"),
    ("max-steps-64-bit", {}, ["train", "demo", "--set", "training.max_steps=100000000000000000000000"],
     "training.max_steps: expected a number that fits in 64 bits"),
    ("batch-zero", {}, ["train", "demo", "--set", "training.per_device_train_batch_size=0"],
     "training.per_device_train_batch_size: expected a value in [1, inf)"),
    ("accumulation-zero", {}, ["train", "demo", "--set", "training.gradient_accumulation_steps=0"],
     "training.gradient_accumulation_steps: expected a value in [1, inf)"),
    ("epochs-zero", {}, ["train", "demo", "--set", "training.num_train_epochs=0"],
     "training.num_train_epochs: expected a value in (0, inf)"),
    ("warmup-negative-set", {}, ["train", "demo", "--set", "training.warmup_steps=-0.5"],
     "--set: training.warmup_steps: expected a value in [0, inf), got -0.5"),
    ("warmup-negative-file", preset("training:\n  warmup_steps: -0.5\n"), ["train", "p.yaml"],
     "p.yaml: training.warmup_steps: expected a value in [0, inf)"),
    ("adam-beta1-one", {}, ["train", "demo", "--set", "training.adam_beta1=1"],
     "training.adam_beta1: expected a value in [0, 1)"),
    ("adam-epsilon-zero", {}, ["train", "demo", "--set", "training.adam_epsilon=0"],
     "training.adam_epsilon: expected a value in (0, inf)"),
    ("max-grad-norm-negative", {}, ["train", "demo", "--set", "training.max_grad_norm=-1"],
     "training.max_grad_norm: expected"),
    ("logging-steps-zero", {}, ["train", "demo", "--set", "training.logging_steps=0"],
     "training.logging_steps: expected a value in (0, inf)"),
    ("save-total-limit-zero", {}, ["train", "demo", "--set", "training.save_total_limit=0"],
     "training.save_total_limit: expected a value in [1, inf)"),
    ("dataloader-workers-negative", {}, ["train", "demo", "--set", "training.dataloader_num_workers=-1"],
     "training.dataloader_num_workers: expected"),
    ("neftune-negative", {}, ["train", "demo", "--set", "training.neftune_noise_alpha=-5"],
     "training.neftune_noise_alpha: expected a value in (0, inf)"),
    ("lora-rank-zero", {}, ["train", "lora", "--set", "peft.r=0"], "peft.r: expected a value in [1, inf)"),
    ("lora-dropout-one", {}, ["train", "lora", "--set", "peft.lora_dropout=1"],
     "peft.lora_dropout: expected a value in [0, 1)"),
    ("lora-alpha-negative", {}, ["train", "lora", "--set", "peft.lora_alpha=-16"], "peft.lora_alpha"),
    ("max-length-zero", {}, ["train", "demo", "--set", "data.max_length=0"],
     "data.max_length: expected a value in [1, inf)"),
    ("max-samples-zero", {}, ["train", "demo", "--set", "data.max_samples=0"], "data.max_samples"),
    ("eval-fraction-zero", {}, ["train", "demo", "--set", "data.eval_fraction=0"],
     "data.eval_fraction: expected a fraction between 0 and 1"),
    ("dpo-beta-zero", {}, ["train", "dpo", "--set", "training.beta=0"],
     "training.beta: expected a value in (0, inf)"),
    ("dpo-label-smoothing", {}, ["train", "dpo", "--set", "training.label_smoothing=0.7"],
     "training.label_smoothing: expected a value in [0, 0.5]"),
    ("ema-decay-above-one", {}, ["train", "demo", "--set", "ema={enabled: true, decay: 1.5}"], "ema"),
    ("ema-update-every-zero", {}, ["train", "demo", "--set", "ema={enabled: true, update_every: 0}"],
     "ema"),
    ("loss-gamma-negative", {}, ["train", "demo", "--set", "loss={strategy: focal, gamma: -1}"],
     "loss.gamma: expected a value in [0, inf), got -1"),
    ("loss-top-fraction", {}, ["train", "demo", "--set", "loss={strategy: hard_tokens, top_fraction: 1.5}"],
     "loss.top_fraction: expected a value in (0, 1], got 1.5"),
    ("loss-chunk-size-zero", {}, ["train", "demo", "--set", "loss={strategy: focal, chunk_size: 0}"],
     "loss.chunk_size: expected a value in [1, inf)"),
    ("loss-label-smoothing-one", {}, ["train", "demo", "--set", "loss={label_smoothing: 1}"],
     "loss.label_smoothing: expected a value in [0, 1)"),
    ("loss-clamp-negative", {}, ["train", "demo", "--set", "loss={strategy: focal, clamp_min: -1}"],
     "loss.clamp_min"),
    ("monitor-explode-below-one", {}, ["train", "demo", "--set", "monitor={enabled: true, explode_factor: 0.5}"],
     "monitor.explode_factor: expected a value in (1, inf), got 0.5"),
    ("monitor-vanish-above-one", {}, ["train", "demo", "--set", "monitor={enabled: true, vanish_factor: 2}"],
     "monitor.vanish_factor: expected a value in (0, 1)"),
    ("monitor-history-beta-one", {}, ["train", "demo", "--set", "monitor={enabled: true, history_beta: 1}"],
     "history_beta"),
    ("monitor-peak-flops-negative", {}, ["train", "demo", "--set", "monitor={enabled: true, peak_flops: -1}"],
     "monitor.peak_flops"),
    ("monitor-nan-threshold", {}, ["train", "demo", "--set", "monitor={enabled: true, grad_norm_max: .nan}"],
     "monitor.grad_norm_max: expected a finite number"),
    ("freeze-ratio-above-one", {}, ["train", "demo", "--set", "freeze={enabled: true, ratio: 1.5}"], "ratio"),
    ("freeze-seed-negative", {}, ["train", "demo", "--set", "freeze={enabled: true, seed: -1}"],
     "freeze.seed: expected"),
    ("autotune-margin", {}, ["train", "demo", "--set", "autotune={enabled: true, max_memory: 1GB, safety_margin: 0.9}"],
     "safety_margin"),
    ("autotune-max-eval-batch-zero", {},
     ["train", "demo", "--set", "autotune={enabled: true, max_memory: 1GB, max_eval_batch: 0}"],
     "autotune.max_eval_batch: expected a value in [1, inf)"),
    ("lr-is-words", preset("training:\n  learning_rate: fast\n"), ["train", "p.yaml"],
     "training.learning_rate: expected float, got 'fast'"),
    ("max-steps-bool", preset("training:\n  max_steps: true\n"), ["train", "p.yaml"],
     "training.max_steps: expected int, got True"),
    ("lr-a-list", {}, ["train", "demo", "--set", "training.learning_rate=[1]"],
     "training.learning_rate: expected float, got [1]"),
    ("eval-strategy-without-eval-data", {}, ["train", "demo", "--set", "training.eval_strategy=steps"],
     "training.eval_strategy: 'steps' needs evaluation data"),
    ("scheduler-unknown-blames-set", {}, ["train", "demo", "--set", "training.lr_scheduler_type=bogus"],
     "--set: training: bogus is not a valid SchedulerType"),
    ("optimizer-unknown-blames-file", preset("training:\n  optim: bogus\n"), ["train", "p.yaml"],
     "p.yaml: training: bogus is not a valid OptimizerNames"),
    ("resume-from-checkpoint-in-preset", preset("training:\n  resume_from_checkpoint: /elsewhere\n"),
     ["train", "p.yaml"], "training.resume_from_checkpoint: use `forge train --resume` instead"),
]

# A hurried user at the command line.
CLI_CASES = [
    ("set-empty", {}, ["train", "demo", "--set", ""], "expected KEY=VALUE"),
    ("set-no-key", {}, ["train", "demo", "--set", "=3"], "expected KEY=VALUE"),
    ("set-empty-key-part", {}, ["train", "demo", "--set", "training.=3"], "expected KEY=VALUE"),
    ("set-unknown-section", {}, ["train", "demo", "--set", "trainer.seed=1"],
     "--set: trainer: unknown section (did you mean 'training'?)"),
    ("set-typo", {}, ["train", "demo", "--set", "training.learning_rte=1"],
     "training.learning_rte: unknown key (did you mean 'learning_rate'?)"),
    ("max-steps-not-a-number", {}, ["train", "demo", "--max-steps", "ten"],
     "forge: error: train: argument --max-steps: invalid int value: 'ten'"),
    ("unknown-option", {}, ["train", "demo", "--lr", "1"], "unrecognized arguments: --lr"),
    ("no-command", {}, [], "the following arguments are required: command"),
    ("unknown-command", {}, ["trian"], "invalid choice: 'trian'"),
    ("output-dir-under-a-file", {"afile": "x"}, ["train", "demo", "--output-dir", "afile/run"],
     "cannot create output directory 'afile/run'"),
    ("overwrite-a-file", {"o": "x"}, ["train", "demo", "--output-dir", "o", "--overwrite"], "is a file"),
    ("data-empty-string", {}, ["train", "demo", "--data", ""], "not a directory saved by datasets"),
    ("model-is-a-file", {"weights.bin": "x"}, ["train", "demo", "--model", "weights.bin"],
     "cannot load model 'weights.bin'"),
    ("resume-path-missing", {}, ["train", "demo", "--resume", "nowhere/checkpoint-5"],
     "--resume: checkpoint 'nowhere/checkpoint-5' not found"),
    ("resume-path-is-a-file", {"ckpt": "x"}, ["train", "demo", "--resume", "ckpt"],
     "--resume: checkpoint 'ckpt' not found"),
    ("resume-into-a-users-directory", {"mydir/README.md": "mine", "mydir/config.json": "{}",
                                       "ckpt-11/trainer_state.json": "{}"},
     ["train", "demo", "--output-dir", "mydir", "--resume", "ckpt-11"],
     "--resume: output directory 'mydir' holds files forge did not write"),
    ("resume-bare-in-a-users-directory", {"mydir/notes.txt": "mine"},
     ["train", "demo", "--output-dir", "mydir", "--resume"], "holds files forge did not write"),
    ("resume-preset-of-a-users-directory", {"mydir/notes.txt": "mine"},
     ["train", "--output-dir", "mydir", "--resume"], "--resume: no forge_preset.yaml in 'mydir'"),
    ("resume-unmarked-first-checkpoint", {"run": run_dir({"ema.safetensors": None}, marked=False)},
     ["train", "demo", "--output-dir", "run", "--resume"], "--resume: no complete checkpoint-* directory"),
]

# Checkpoints that are marked complete, but whose files a disk (or an edit) broke since.
CHECKPOINT_CASES = [
    ("checkpoint-state-corrupt", {"run": run_dir({"trainer_state.json": '{"global_st'})},
     ["train", "demo", "--output-dir", "run", "--resume"],
     "checkpoint-2/trainer_state.json: corrupt, not valid JSON"),
    ("checkpoint-state-not-utf8", {"run": run_dir({"trainer_state.json": b'{"a": "\xff"}'})},
     ["train", "demo", "--output-dir", "run", "--resume"], "trainer_state.json: corrupt"),
    ("checkpoint-state-missing", {"run": run_dir({"trainer_state.json": None})},
     ["train", "demo", "--output-dir", "run", "--resume"], "no trainer_state.json"),
    ("checkpoint-weights-cut-short", {"run": run_dir({"model.safetensors": b"\x40\0\0\0\0\0\0\0{}"})},
     ["train", "demo", "--output-dir", "run", "--resume"], "checkpoint-2/model.safetensors: corrupt"),
    ("checkpoint-optimizer-not-an-archive", {"run": run_dir({"optimizer.pt": b"PK\x03\x04 cut"})},
     ["train", "demo", "--output-dir", "run", "--resume"], "optimizer.pt: corrupt or cut short"),
    ("checkpoint-forge-state-corrupt", {"run": run_dir({"forge_monitor.json": "{"})},
     ["train", "demo", "--output-dir", "run", "--resume"], "forge_monitor.json: corrupt"),
    ("checkpoint-path-corrupt", {"run": run_dir({"trainer_state.json": "[1, "})},
     ["train", "demo", "--resume", "run/checkpoint-2"], "trainer_state.json: corrupt, not valid JSON"),
]

LONG_LINE = json.dumps({"prompt": "x" * (5 * MIB), "completion": "y"}).encode() + b"\n"

# Data files: special files, sizes, encodings, rows whose types differ, broken containers.
DATA_CASES = [
    ("data-fifo", {"d.jsonl": Fifo()}, ["train", "sft", "--data", "d.jsonl"],
     "data 'd.jsonl' is not a regular file (a pipe or a device?)"),
    ("data-dev-zero", {}, ["train", "sft", "--data", "/dev/zero"], "data '/dev/zero' is not a regular file"),
    ("data-link-to-dev-zero", {"z.jsonl": Link("/dev/zero")}, ["train", "sft", "--data", "z.jsonl"],
     "data 'z.jsonl' is not a regular file"),
    ("eval-data-fifo", {"d.jsonl": jsonl(SFT_ROW), "e.jsonl": Fifo()},
     ["train", "sft", "--data", "d.jsonl", "--set", "data.eval_path=e.jsonl"],
     "data 'e.jsonl' is not a regular file"),
    ("data-line-too-long", {"d.jsonl": jsonl(SFT_ROW).encode() + LONG_LINE},
     ["train", "sft", "--data", "d.jsonl"], "d.jsonl row 2: longer than 4 MB"),
    ("data-no-newline-ever", {"d.jsonl": b"x" * (5 * MIB)}, ["train", "sft", "--data", "d.jsonl"],
     "d.jsonl row 1: longer than 4 MB"),
    ("data-line-too-long-gz", {"d.jsonl.gz": Gz(LONG_LINE)}, ["train", "sft", "--data", "d.jsonl.gz"],
     "d.jsonl.gz row 1: longer than 4 MB"),
    ("data-cell-too-long-csv", {"d.csv": "prompt,completion\n" + "x" * (5 * MIB) + ",y\n"},
     ["train", "sft", "--data", "d.csv"], "d.csv row 1: more than 4 MB of text"),
    ("data-gz-garbage", {"d.jsonl.gz": b"not gzip at all"}, ["train", "sft", "--data", "d.jsonl.gz"],
     "d.jsonl.gz: not a valid gzip file"),
    ("data-gz-cut-short", {"d.jsonl.gz": Gz(jsonl(*[SFT_ROW] * 50).encode(), keep=60)},
     ["train", "sft", "--data", "d.jsonl.gz"], "d.jsonl.gz: not a valid gzip file"),
    ("data-json-gz-garbage", {"d.json.gz": b"\x1f\x8b garbage"}, ["train", "sft", "--data", "d.json.gz"],
     "not a valid gzip file"),
    ("data-not-utf8-jsonl", {"d.jsonl": jsonl(SFT_ROW).encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n'},
     ["train", "sft", "--data", "d.jsonl"], "d.jsonl row 2: not UTF-8 text (byte 15)"),
    ("data-not-utf8-json", {"d.json": b'[\n{"prompt": "a", "completion": "b"},\n{"prompt": "\xff"}\n]'},
     ["train", "sft", "--data", "d.json"], "d.json: line 3: not UTF-8 text"),
    ("data-utf16-jsonl", {"d.jsonl": jsonl(SFT_ROW).encode("utf-16")}, ["train", "sft", "--data", "d.jsonl"],
     "d.jsonl row 1: not UTF-8 text"),
    ("data-not-utf8-csv", {"d.csv": b"prompt,completion\ncaf\xe9,x\n"}, ["train", "sft", "--data", "d.csv"],
     "d.csv"),
    ("rows-text-then-list", {"d.jsonl": jsonl(SFT_ROW, {"prompt": ["a"], "completion": "b"})},
     ["train", "sft", "--data", "d.jsonl"], "d.jsonl row 2: field 'prompt' is a list, but text in row 1"),
    ("rows-text-then-number", {"d.jsonl": jsonl(SFT_ROW, SFT_ROW, {"prompt": "a", "completion": 4})},
     ["train", "sft", "--data", "d.jsonl"], "d.jsonl row 3: field 'completion' is a number, but text in row 1"),
    ("rows-number-then-text-extra-column", {"d.jsonl": jsonl({**SFT_ROW, "id": 1}, {**SFT_ROW, "id": "b"})},
     ["train", "sft", "--data", "d.jsonl"], "row 2: field 'id' is text, but a number in row 1"),
    ("rows-bool-then-number", {"d.jsonl": jsonl({**SFT_ROW, "ok": True}, {**SFT_ROW, "ok": 3})},
     ["train", "sft", "--data", "d.jsonl"], "row 2: field 'ok' is a number, but true/false in row 1"),
    ("rows-object-then-text", {"d.jsonl": jsonl({**SFT_ROW, "meta": {"a": 1}}, {**SFT_ROW, "meta": "x"})},
     ["train", "sft", "--data", "d.jsonl"], "row 2: field 'meta' is text, but an object in row 1"),
    ("rows-nested-content-type", {"d.jsonl": jsonl(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 7}]})},
     ["train", "sft", "--data", "d.jsonl"],
     "d.jsonl row 2: field 'messages[1].content' is a number, but text in row 1"),
    ("row-list-of-mixed-items", {"d.jsonl": jsonl({**SFT_ROW, "tags": [1, "x"]})},
     ["train", "sft", "--data", "d.jsonl"], "row 1: field 'tags[1]' is text, but a number in row 1"),
    ("row-integer-too-large", {"d.jsonl": jsonl({**SFT_ROW, "id": 2**70})},
     ["train", "sft", "--data", "d.jsonl"], "row 1: field 'id' is a number too large for a 64-bit integer"),
    ("json-rows-of-mixed-types", {"d.json": json.dumps([SFT_ROW, {"prompt": 1, "completion": "x"}])},
     ["train", "sft", "--data", "d.json"], "d.json row 2: field 'prompt' is a number, but text in row 1"),
    ("json-nested-too-deeply", {"d.json": "[" * 100000 + "]" * 100000}, ["train", "sft", "--data", "d.json"],
     "d.json: JSON nested too deeply"),
    ("jsonl-row-nested-too-deeply", {"d.jsonl": "[" * 100000 + "]" * 100000 + "\n"},
     ["train", "sft", "--data", "d.jsonl"], "d.jsonl row 1: JSON nested too deeply"),
    ("jsonl-row-is-a-list", {"d.jsonl": "[1, 2]\n"}, ["train", "sft", "--data", "d.jsonl"],
     "d.jsonl row 1: expected a JSON object"),
    ("json-is-an-object", {"d.json": '{"a": 1, "b": 2}'}, ["train", "sft", "--data", "d.json"],
     "expected a JSON list of objects"),
    ("json-truncated", {"d.json": '[{"prompt": "a", "compl'}, ["train", "sft", "--data", "d.json"],
     "d.json: invalid JSON at line 1"),
    ("parquet-garbage", {"d.parquet": b"PAR1 not really"}, ["train", "sft", "--data", "d.parquet"],
     "d.parquet: cannot read PARQUET"),
    ("saved-dataset-corrupt", {"ds/dataset_info.json": "{", "ds/state.json": "{"},
     ["train", "sft", "--data", "ds"], "ds: cannot read the saved dataset"),
    ("saved-dataset-no-train-split", {"ds": saved_dataset_without_train_split},
     ["train", "sft", "--data", "ds"], "no split 'train' (has test)"),
    ("directory-of-jsonl-files", {"dir/a.jsonl": jsonl(SFT_ROW)}, ["train", "sft", "--data", "dir"],
     "not a directory saved by datasets"),
    ("messages-not-a-list", {"d.jsonl": jsonl({"messages": "hello"})}, ["train", "sft", "--data", "d.jsonl"],
     "row 1: field 'messages' must be a list of {role, content} messages"),
    ("message-without-role", {"d.jsonl": jsonl({"messages": [{"content": "x"}]})},
     ["train", "sft", "--data", "d.jsonl"], "messages[0] must have 'role' and 'content'"),
    ("message-empty-content", {"d.jsonl": jsonl({"messages": [{"role": "user", "content": ""}]})},
     ["train", "sft", "--data", "d.jsonl"], "messages[0] has empty 'content'"),
    ("alpaca-without-output", {"d.jsonl": jsonl({"instruction": "a", "output": "b"}, {"instruction": "c"})},
     ["train", "sft", "--data", "d.jsonl"], "row 2: field 'output' is missing or empty"),
    ("only-blank-lines", {"d.jsonl": "\n\n  \n"}, ["train", "sft", "--data", "d.jsonl"], "the data set is empty"),
    ("eval-path-missing", {"d.jsonl": jsonl(SFT_ROW)},
     ["train", "sft", "--data", "d.jsonl", "--set", "data.eval_path=none.jsonl"],
     "data file 'none.jsonl' not found"),
]

# Model directories a download or a disk broke, and one that tries to run code when loaded.
MODEL_CASES = [
    ("weights-cut-short", {"m": Model(cut_weights)}, ["train", "demo", "--model", "m"],
     "m/model.safetensors: cut short"),
    ("weights-garbage", {"m": Model(garbage_weights)}, ["train", "demo", "--model", "m"],
     "m/model.safetensors: corrupt safetensors file"),
    ("weights-empty", {"m": Model(empty_weights)}, ["train", "demo", "--model", "m"],
     "corrupt safetensors file"),
    ("weights-header-not-json", {"m": Model(bad_header_weights)}, ["train", "demo", "--model", "m"],
     "its header is not valid JSON"),
    ("weights-cut-short-lora", {"m": Model(cut_weights)}, ["train", "lora", "--model", "m"], "cut short"),
    ("config-shapes-differ", {"m": Model(config_edit(hidden_size=64, intermediate_size=128))},
     ["train", "demo", "--model", "m"], "cannot load model 'm': its config.json does not match its weights"),
    ("config-more-layers", {"m": Model(config_edit(num_hidden_layers=6))}, ["train", "demo", "--model", "m"],
     "weights the config asks for are not in the files (model.layers.4"),
    ("config-not-json", {"m": Model(config_text(b"{bad"))}, ["train", "demo", "--model", "m"],
     "cannot load model 'm'"),
    ("config-not-utf8", {"m": Model(config_text(b'{"model_type": "\xff"}'))},
     ["train", "demo", "--model", "m"], "cannot load model 'm'"),
    ("config-unknown-architecture", {"m": Model(config_edit(model_type="nonexistent"))},
     ["train", "demo", "--model", "m"], "cannot load model 'm'"),
    ("weights-are-a-pickle", {"m": Model(pickled_weights)}, ["train", "demo", "--model", "m"],
     "torch refused to unpickle a weights file"),
    ("tokenizer-cut-short", {"m": Model(tokenizer_text(b'{"version": "1.0", "trunc'))},
     ["train", "demo", "--model", "m"], "cannot load model 'm'"),
    ("tokenizer-wrong-shape", {"m": Model(tokenizer_text(b'{"model": 3}'))},
     ["train", "demo", "--model", "m"], "cannot load the tokenizer of 'm': its files are broken"),
    ("model-dir-empty", {"m/.keep": ""}, ["train", "demo", "--model", "m"], "cannot load model 'm'"),
    ("adapter-config-broken", {"a/adapter_config.json": "{bad"}, ["train", "lora", "--model", "a"],
     "cannot read the adapter config"),
    ("adapter-without-base", {"a/adapter_config.json": "{}"}, ["train", "lora", "--model", "a"],
     "no base_model_name_or_path"),
    ("hub-model-offline", {}, ["train", "demo", "--model", "nobody-forge-test/no-such-model"],
     "cannot load model 'nobody-forge-test/no-such-model'"),
]

# `forge report` on run directories with malformed (or hostile) files.
REPORT_CASES = [
    ("report-no-directory", {}, ["report", "nowhere"], "run directory 'nowhere' not found"),
    ("report-empty-directory", {"r/.keep": ""}, ["report", "r"], "has no trainer_state.json"),
    ("report-state-not-json", {"r": report_dir("{bad")}, ["report", "r"], "cannot read 'r/trainer_state.json'"),
    ("report-state-not-utf8", {"r": report_dir(b'{"a": "\xff"}')}, ["report", "r"], "not UTF-8 text"),
    ("report-state-a-list", {"r": report_dir("[]")}, ["report", "r"], "should be a JSON object, got list"),
    ("report-log-history-a-number", {"r": report_dir('{"log_history": 5}')}, ["report", "r"],
     "'log_history' should be a list, got int"),
    ("report-log-entry-a-number", {"r": report_dir('{"log_history": [1]}')}, ["report", "r"],
     "log_history[0] should be an object, got int"),
    ("report-log-entry-step-text", {"r": report_dir('{"log_history": [{"step": "x", "loss": 1}]}')},
     ["report", "r"], "log_history[0] has no numeric 'step'"),
    ("report-state-nested-too-deeply", {"r": report_dir("[" * 100000 + "]" * 100000)}, ["report", "r"],
     "JSON nested too deeply"),
    ("report-checkpoint-state-corrupt", {"r": report_dir(None, checkpoint_state="{")}, ["report", "r"],
     "cannot read 'r/checkpoint-2/trainer_state.json'"),
    ("report-monitor-a-list", {"r": report_dir(monitor="[1]")}, ["report", "r"],
     "monitor_summary.json: should be a JSON object"),
    ("report-anomalies-text", {"r": report_dir(monitor='{"anomalies": "x"}')}, ["report", "r"],
     "'anomalies' should be a list, got str"),
    ("report-event-a-number", {"r": report_dir(monitor='{"events": [3]}')}, ["report", "r"],
     "events[0] should be an object"),
    ("report-monitor-row-without-step", {"r": report_dir(monitor='{"history": [{"loss": 1}]}')},
     ["report", "r"], "history[0] has no numeric 'step'"),
    ("report-skipped-steps-text", {"r": report_dir(monitor='{"skipped_steps": "all"}')}, ["report", "r"],
     "'skipped_steps' should be a list"),
]

CORPUS = CASES + YAML_CASES + PATH_CASES + NUMBER_CASES + CLI_CASES + CHECKPOINT_CASES + DATA_CASES \
    + MODEL_CASES + REPORT_CASES


def make_files(root: Path, files: dict) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def snapshot(root: Path) -> dict[Path, bytes]:
    # Regular files only: reading a FIFO would block the test itself.
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.fixture
def deadline():
    """Fail a case that hangs (a FIFO read, a YAML bomb formatted) instead of blocking CI."""
    def hung(signum, frame):
        raise TimeoutError("forge hung on this input")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def library_logs_to_this_stderr() -> None:
    """Point the libraries' log handlers at this test's stderr (they keep the stream that was
    current when they were made: a closed one from an earlier test would print a traceback).
    Called in the test itself: pytest swaps sys.stderr between a test's setup and its call."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr  # not setStream: it flushes the old, closed one
                if "flush" in vars(handler):  # transformers pins the stderr of its import time
                    handler.flush = sys.stderr.flush


def forge_errors(stderr: str) -> list[str]:
    """The `forge: error:` lines, checked to end the output (a library may warn before them,
    e.g. transformers' load report on mismatched weights) with no traceback anywhere."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines and lines[-1].startswith("forge: error: "), lines[-5:]
    errors = [line for line in lines if line.startswith("forge: error: ")]
    assert all(len(line) < 1000 for line in errors), "one clear line, not a dump of the input"
    return errors


@pytest.mark.parametrize("files, argv, message", [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_bad_input_is_one_line_exit_2_and_nothing_lost(files, argv, message, tmp_path, monkeypatch,
                                                       capsys, deadline):
    monkeypatch.chdir(tmp_path)
    make_files(tmp_path, files)
    before = snapshot(tmp_path)
    if argv[:1] == ["train"] and "--output-dir" not in argv:
        argv = [*argv, "--output-dir", "out"]
    capsys.readouterr()  # what building the files printed
    library_logs_to_this_stderr()
    assert cli.main(argv) == 2
    err = forge_errors(capsys.readouterr().err)
    assert any(message in line for line in err), err
    assert snapshot(tmp_path) == before  # nothing of the user's changed, and nothing new written
    assert not (tmp_path / "PWNED").exists()  # no code from a preset or a pickle ran


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 150
    assert len({c[0] for c in CORPUS}) == len(CORPUS)  # ids name one case each


def test_quantization_without_bitsandbytes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an absent package looks like
    argv = ["train", "qlora", "--model", "builtin:tiny-llama", "--output-dir", "out"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "forge: error: model.quantization needs bitsandbytes: pip install bitsandbytes")
    assert not (tmp_path / "out").exists()
