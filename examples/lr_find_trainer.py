"""The learning-rate range test on a plain HF Trainer, offline, on a CPU.

    python examples/lr_find_trainer.py [--steps 60]

``forge.tune.lr_find(trainer)`` trains for ``--steps`` steps while the rate grows
exponentially, records the loss of every step, and suggests the rate of steepest descent of
the smoothed loss. The weights and arguments are restored afterwards, so the same trainer then
trains at the suggested rate. The plot goes to ``lr_find.png`` when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from forge.demo import builtin_tokenizer  # noqa: E402
from forge.tune import lr_find, plot_lr_find  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    cli = parser.parse_args()

    torch.set_num_threads(1)
    tokenizer = builtin_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64,
                                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=128))
    rng = random.Random(0)
    texts = []
    for _ in range(256):
        start = rng.randrange(50)
        texts.append("count " + " ".join(str(start + i) for i in range(12)))
    ids = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    ids = [row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids]
    args = TrainingArguments("outputs/lr-find-example", per_device_train_batch_size=16, max_steps=20,
                             report_to="none", use_cpu=True, disable_tqdm=True, learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))

    result = lr_find(trainer, start_lr=1e-5, end_lr=1.0, num_steps=cli.steps)
    print(f"range test: {len(result.losses)} steps, loss {result.losses[0]:.3f} -> min smoothed "
          f"{min(result.smoothed):.3f}{', diverged' if result.diverged else ''}")
    for caveat in result.caveats:
        print(f"note: {caveat}")
    if result.suggestion is None:
        print("no suggestion from this curve")
        return
    print(f"suggested learning rate: {result.suggestion:.2g}")
    if importlib.util.find_spec("matplotlib") is not None:
        with open("lr_find.png", "wb") as f:
            f.write(plot_lr_find(result))
    args.learning_rate = result.suggestion  # the same trainer, weights restored, trains at it
    print(f"trained at it: loss {trainer.train().training_loss:.3f}")


if __name__ == "__main__":
    main()
