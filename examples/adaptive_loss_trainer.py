"""Adaptive token-level loss on an unchanged HF Trainer, with the fused (logits-free) LM head.

Run (offline, CPU, ~10 s plus imports)::

    python examples/adaptive_loss_trainer.py

Trains a tiny randomly initialised Llama three times on a synthetic counting task:
1. the standard path (the model's own cross-entropy on full logits),
2. the same plain cross-entropy through ``AdaptiveLoss`` with the fused LM head (identical curve),
3. focal loss (gamma 2) plus z-loss, fused, with gradient accumulation.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from forge.loss import AdaptiveLoss, focal


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def counting_dataset(n: int = 64, length: int = 16) -> Dataset:
    """Each row counts up from a random start (mod 256); the first 4 tokens are a masked prompt."""
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 256, (n, 1), generator=g)
    ids = (starts + torch.arange(length)) % 256
    labels = ids.clone()
    labels[:, :4] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def train(output_dir: str, loss_fn: AdaptiveLoss | None, accumulation: int = 1) -> list[float]:
    model = tiny_llama()
    callbacks = None
    if loss_fn is not None:
        # The model's forward now computes this loss (decoder -> hidden states -> the LM head chunk
        # by chunk, no logits); the callback logs its forge/loss/... figures.
        loss_fn.attach(model)
        callbacks = [loss_fn.callback()]
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=16 // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=8,
        learning_rate=3e-3,
        logging_steps=2,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=counting_dataset(), callbacks=callbacks)
    trainer.train()
    return [round(h["loss"], 5) for h in trainer.state.log_history if "loss" in h]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None)
    out = parser.parse_args().output_dir or tempfile.mkdtemp(prefix="forge-loss-")

    standard = train(os.path.join(out, "standard"), None)
    fused = train(os.path.join(out, "fused"), AdaptiveLoss())
    print("standard loss curve:", standard)
    print("fused loss curve:   ", fused)
    diff = max(abs(a - b) for a, b in zip(standard, fused))
    if diff > 1e-4:
        raise SystemExit(f"fused and standard curves differ by {diff}")
    print(f"fused loss matches standard (max difference {diff:.1e})")

    focal_curve = train(os.path.join(out, "focal"), AdaptiveLoss(focal(2.0), z_loss=1e-4), accumulation=4)
    print("focal + z-loss, fused, batch 4 x accumulation 4:", focal_curve)


if __name__ == "__main__":
    main()
