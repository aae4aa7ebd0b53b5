"""EMA weights on a plain HF Trainer, offline, in seconds on a CPU.

    python examples/ema_trainer.py --output_dir /tmp/ema-demo

One line adds the EMA: ``callbacks=[EMACallback(...)]``. It updates after every optimizer
step, is saved in every checkpoint (``ema.safetensors``) and restored on resume, evaluates the
EMA weights next to the raw ones (``eval_ema_loss``), and with ``save_ema_model=True`` the final
model in ``--output_dir`` is the EMA. The model is a tiny Llama built from a config and the
data are Python lists, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from forge.ema import EMACallback  # noqa: E402


def toy_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences that count up modulo 64 from a random start: easy to learn, so loss falls fast."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 64, (n, 1), generator=gen)
    ids = (starts + torch.arange(24)) % 64
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/ema-demo")
    parser.add_argument("--max_steps", type=int, default=40)
    cli = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)

    args = TrainingArguments(
        output_dir=cli.output_dir,
        max_steps=cli.max_steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=2e-2,
        lr_scheduler_type="constant",  # a noisy constant-rate run is where an average helps most
        eval_strategy="steps",
        eval_steps=cli.max_steps // 4,
        save_strategy="steps",
        save_steps=cli.max_steps // 2,  # each checkpoint gets an ema.safetensors
        logging_steps=10,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    # decay for a 40-step run: the average spans ~1/(1-decay) = 10 steps (docs/ema.md, "choosing decay").
    ema = EMACallback(decay=0.9, eval_with_ema=True, save_ema_model=True)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=toy_data(512, seed=1),
        eval_dataset=toy_data(64, seed=2),
        callbacks=[ema],
    )
    trainer.train()

    rows: dict[int, dict[str, float]] = {}
    for entry in trainer.state.log_history:
        for key in ("eval_loss", "eval_ema_loss"):
            if key in entry:
                rows.setdefault(entry["step"], {"step": entry["step"]})[key] = round(entry[key], 4)
    for row in rows.values():
        print(json.dumps(row))  # the last line: the final evaluation, raw vs EMA weights


if __name__ == "__main__":
    main()
