"""Freeze layers of a tiny Llama and train it with the HF Trainer, fully offline, on CPU.

Run::

    python examples/freeze_layers_trainer.py            # about 10 s on a laptop CPU

What it shows, in order:
1. ``find_layers`` discovers the blocks, embeddings, norm and head (no per-model table);
2. ``suggest_freeze`` picks how many blocks to freeze for a memory budget and explains why;
3. ``freeze_layers`` applies it and prints the per-block table;
4. training with LISA layer sampling over the remaining blocks plus layer-wise LR decay;
5. a check that every frozen parameter is bit-identical after training.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the Hub

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from forge.layers import find_layers, freeze_layers
from forge.layers.llrd import layerwise_lr_optimizer
from forge.layers.schedules import LISACallback
from forge.layers.suggest import suggest_freeze


def main() -> None:
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config)

    info = find_layers(model)
    print(f"{info.num_blocks} blocks in {info.stacks}; embeddings {info.embeddings}; head {info.head}")

    # A synthetic task: copy a random sequence (any text dataset works the same way).
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(64):
        ids = torch.randint(0, config.vocab_size, (32,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})

    # Ask for the smallest freeze that fits 90% of what full fine-tuning would need.
    batch = {k: torch.stack([r[k] for r in rows[:8]]) for k in rows[0]}
    full = suggest_freeze(model, batch).plans[0].peak_bytes
    suggestion = suggest_freeze(model, batch, budget_bytes=int(0.9 * full))
    print(suggestion)
    report = freeze_layers(model, indices=list(suggestion.plan.frozen_blocks), embeddings=True)
    print(report)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8,
            max_steps=12,
            learning_rate=3e-3,
            weight_decay=0.1,
            logging_steps=4,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_pin_memory=False,
        )
        lisa = LISACallback(model, active_layers=2, every_n_steps=4, seed=args.seed)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=rows,
            callbacks=[lisa],
            optimizer_cls_and_kwargs=layerwise_lr_optimizer(args, decay=0.8),
        )
        trainer.train()
    print("LISA draws:", [h["blocks"] for h in lisa.history])
    unchanged = all(torch.equal(model.get_parameter(n), before) for n, before in frozen.items())
    print(f"{len(frozen)} frozen tensors bit-identical after training: {unchanged}")
    if not unchanged:
        raise SystemExit("a frozen parameter changed")


if __name__ == "__main__":
    main()
