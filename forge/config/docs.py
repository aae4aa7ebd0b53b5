"""Write ``docs/presets.md`` from the preset schema, so the key reference cannot drift.

    python -m forge.config.docs > docs/presets.md
"""

from __future__ import annotations

import dataclasses

from forge.config.loader import list_presets, load_preset
from forge.config.schema import (
    FEATURE_SECTIONS,
    DataConfig,
    ModelConfig,
    _hints,
    feature_config_class,
)
from forge.core.typecheck import describe

INTRO = """\
# Presets

A preset is one YAML file that describes a whole fine-tuning run. forge ships {count}
(`forge presets list`); `forge presets show NAME` prints one fully resolved.

| preset | what it is for |
| --- | --- |
{table}

Run one with `forge train NAME`, or load it into your own code:

```python
import forge, trl
preset = forge.load_preset("qlora", ["training.learning_rate=1e-4"])
args = preset.training_args()          # the method's TRL config: trl.SFTConfig, trl.DPOConfig, ...
lora = preset.peft_config()            # peft.LoraConfig, or None for a full fine-tune
bnb = preset.quantization_config()     # transformers.BitsAndBytesConfig, or None
plain = preset.get_args_dict()         # the same arguments as a dict; needs no accelerate
print(preset.to_yaml())                # the fully resolved preset
```

## Writing your own

```yaml
# my_run.yaml: forge train my_run.yaml
extends: lora                 # a shipped preset by name, or a file: ./base.yaml
model:
  name_or_path: Qwen/Qwen3-1.7B
data:
  path: data/train.jsonl
  eval_fraction: 0.05
training:
  num_train_epochs: 2
trackers: [tensorboard]
```

* `extends` deep-merges: mappings merge key by key, anything else (lists, scalars, `null`)
  replaces. A chain may be as long as you like; a cycle is an error.
* `--set KEY=VALUE` (repeatable) overrides any key after merging; the value is read as
  YAML (`--set trackers=[wandb]`, `--set peft=null`, `--set training.learning_rate=1e-4`).
  Shortcuts: `--model`, `--data`, `--output-dir`, `--max-steps`.
* Validation is strict: an unknown key or a wrong type is an error naming the file (or
  `--set`), the dotted key and the closest valid key; every problem is listed at once and
  `forge` exits with code 2.

## Sections

### `method`

Which TRL trainer runs the preset (default `sft`); the `training:` section is checked against
that trainer's config class. The table lives in `forge/config/methods.py`.

| method | what it is | TRL config / trainer | data | refused sections |
| --- | --- | --- | --- | --- |
{methods}

### `description`

One line shown by `forge presets list`.
"""

TRAINING = """\
### `training`

Any field of the method's TRL config: [`SFTConfig`](https://huggingface.co/docs/trl/sft_trainer)
(method `sft`), [`DPOConfig`](https://huggingface.co/docs/trl/dpo_trainer) (`dpo`), `KTOConfig`
(`kto`), `ORPOConfig` (`orpo`) or `CPOConfig` (`cpo`), which extend
`transformers.TrainingArguments`; keys and types are checked against the installed TRL. forge
sets three of them from other sections: `max_length` and `packing` from `data`, `report_to`
from `trackers` (`training.max_length` is an error that says so). `output_dir` defaults to
`outputs/<preset name>`. `bf16` follows TRL's default (on) where a bf16-capable accelerator
exists and is turned off on a CPU-only machine, unless the preset sets it. Note that
transformers 5 has no `warmup_ratio`: a float below 1 in `warmup_steps` is a fraction of
the total steps.

The values the main shipped presets set (`forge presets show NAME` prints any other):

| key | sft | lora | qlora | dpo | meaning |
| --- | --- | --- | --- | --- | --- |
{training_rows}
"""

PEFT = """\
### `peft`

Keyword arguments of [`peft.LoraConfig`](https://huggingface.co/docs/peft/package_reference/lora);
`null` (or absent) means a full fine-tune. `task_type` defaults to `CAUSAL_LM`.

| key | lora / qlora / dpo | meaning |
| --- | --- | --- |
| `r` | 16 | adapter rank: higher raises capacity and memory |
| `lora_alpha` | 32 | scale of the adapter output is `lora_alpha / r` |
| `lora_dropout` | 0.05 | dropout on the adapter input |
| `target_modules` | `all-linear` | every linear layer except the LM head |
| `bias` | `none` | train no biases |
| `task_type` | `CAUSAL_LM` | PEFT task type |

Any other `LoraConfig` field works too: `dora` sets `use_dora: true`, `rslora` sets
`use_rslora: true` (scale `lora_alpha / sqrt(r)`) at `r: 64`, `pissa` sets
`init_lora_weights: pissa` (forge saves the result as a plain LoRA adapter of the original
base, PEFT's conversion, so `forge merge` applies it as usual).

### `trackers`

A list of `tensorboard`, `wandb`, `mlflow` (default `[]`): turns on the transformers
integration for each (`report_to`). Install the matching extra, e.g.
`pip install "transformers-forge[wandb]"`.
"""

MEANINGS = {
    "learning_rate": "peak learning rate", "lr_scheduler_type": "decay shape after warm-up",
    "warmup_steps": "warm-up length (float < 1: fraction of steps)",
    "weight_decay": "AdamW weight decay", "num_train_epochs": "passes over the data",
    "per_device_train_batch_size": "examples per device per micro-step",
    "gradient_accumulation_steps": "micro-steps per optimizer step",
    "max_grad_norm": "gradient clipping norm", "logging_steps": "log every N steps",
    "save_strategy": "when to checkpoint", "save_steps": "checkpoint every N steps",
    "save_total_limit": "checkpoints kept", "seed": "random seed", "beta": "DPO: pull toward the reference",
}


# The docs page of each feature section (tests check that every one exists).
DOC_PAGES = {"autotune": "docs/autotune.md", "ema": "docs/ema.md", "freeze": "docs/layers.md",
             "loss": "docs/loss.md", "monitor": "docs/monitor.md"}


def _section_table(name: str, cls: type) -> str:
    rows = [f"### `{name}`\n", (cls.__doc__ or "").strip().splitlines()[0], "",
            "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        text = f.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{describe(hints[f.name])}` | `{default!r}` | {text} |"
                    .replace("`None`", "`null`").replace("`True`", "`true`")
                    .replace("`False`", "`false`"))
    return "\n".join(rows) + "\n"


def _methods_table() -> str:
    from forge.config.methods import METHOD_TABLE, refusals

    rows = []
    for name, m in METHOD_TABLE.items():
        classes = f"`{m.config.replace(':', '.')}` / `{m.trainer.rsplit(':', 1)[1]}`"
        refused = ", ".join(f"`{k}`" for k in refusals(name)) or "none"
        rows.append(f"| `{name}` | {m.summary} | {classes} | {DATA_KINDS[m.data]} | {refused} |")
    return "\n".join(rows)


DATA_KINDS = {"lm": "messages, prompt/completion, alpaca, text",
              "preference": "prompt/chosen/rejected, chosen/rejected",
              "unpaired": "prompt/completion/label; pairs are unpaired"}


def _sources_table() -> str:
    from forge.config.sources import SourceConfig

    table = _section_table("data.sources[i]", SourceConfig).replace("### `data.sources[i]`\n", "")
    return "#### `data.sources`\n" + table.replace("| `''` |", "| required |") + \
        "\nSee [data.md](data.md) for mixing, column maps and packing.\n"


def render() -> str:
    presets = list_presets()
    table = "\n".join(f"| `{n}` | {d} |" for n, d in presets.items())
    shipped = {n: load_preset(n).config["training"] for n in ("sft", "lora", "qlora", "dpo")}
    keys = list(dict.fromkeys(k for t in shipped.values() for k in t))
    training_rows = "\n".join(
        f"| `{k}` | " + " | ".join(f"`{shipped[n][k]}`" if k in shipped[n] else ""
                                   for n in shipped) + f" | {MEANINGS.get(k, '')} |"
        for k in keys)
    intro = INTRO.format(table=table, count=len(presets), methods=_methods_table())
    parts = [intro, _section_table("model", ModelConfig),
             _section_table("data", DataConfig), _sources_table(), TRAINING.format(training_rows=training_rows),
             PEFT]
    for section in FEATURE_SECTIONS:
        try:
            cls = feature_config_class(section)
        except (ImportError, AttributeError):
            continue
        doc = DOC_PAGES[section]
        parts.append(_section_table(section, cls) + f"\nSee [{doc}]({doc.removeprefix('docs/')}).\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
