"""Autotune the batch size and gradient accumulation of a plain HF Trainer, offline, on a CPU.

    python examples/autotune_trainer.py --output_dir /tmp/autotune-demo --max_memory 24MB

The Trainer is built as usual with a guess (4 per device x 16 accumulation = a global batch
of 64). One call before ``train()`` measures a few real steps, picks the largest per-device
batch that fits ``--max_memory`` and lowers the accumulation so the global batch stays 64,
tunes the evaluation batch separately, and prints the probes. On a GPU, leave out
``--max_memory`` to use the free memory. The model is a tiny Llama built from a config and the
tokenizer ships inside forge, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from forge.autotune import autotune_batch_size, format_table  # noqa: E402
from forge.demo import builtin_tokenizer  # noqa: E402


def toy_texts(n: int, seed: int) -> list[str]:
    """Counting sequences of varied length: the longest one sets the probes' sequence length."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        start, length = rng.randrange(100), rng.randrange(8, 24)
        texts.append("count " + " ".join(str(start + i) for i in range(length)))
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/autotune-demo")
    parser.add_argument("--max_memory", default=None if torch.cuda.is_available() else "24MB",
                        help="per-device budget, e.g. 24MB or 20GB (default: free GPU memory)")
    parser.add_argument("--max_steps", type=int, default=4)
    cli = parser.parse_args()

    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # a model this small runs fastest on one thread, on a shared CPU too
    tokenizer = builtin_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
    ))

    def tokenize(rows):
        return tokenizer(rows["text"])

    train = Dataset.from_dict({"text": toy_texts(1024, seed=1)}).map(tokenize, batched=True, remove_columns=["text"])
    dev = Dataset.from_dict({"text": toy_texts(128, seed=2)}).map(tokenize, batched=True, remove_columns=["text"])

    args = TrainingArguments(
        output_dir=cli.output_dir,
        per_device_train_batch_size=4,  # a guess: autotune replaces it...
        gradient_accumulation_steps=16,  # ...and this, keeping 4 x 16 = 64 examples per step
        per_device_eval_batch_size=8,
        max_steps=cli.max_steps,
        learning_rate=3e-3,
        eval_strategy="steps",
        eval_steps=cli.max_steps,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=dev,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    result = autotune_batch_size(trainer, max_memory=cli.max_memory, tune_eval=True)
    print(format_table(result))

    trainer.train()
    last = [h for h in trainer.state.log_history if "eval_loss" in h][-1]
    print(f"trained {trainer.state.global_step} steps of {result.global_batch} examples "
          f"({args.per_device_train_batch_size} x {args.gradient_accumulation_steps}); "
          f"eval_loss {last['eval_loss']:.3f}")


if __name__ == "__main__":
    main()
