"""Pre-flight checks on a plain TRL SFTTrainer: a collator that masks EOS is caught before training.

    python examples/doctor_trainer.py

The tokenizer has no pad token of its own, so it pads with EOS, the usual choice for causal
LMs. A hand-written collator then masks every pad id in the labels, which masks every EOS
too: the model would never learn to stop, and the training loss would look fine.
``forge.doctor.check_trainer`` runs the loss-mask and EOS checks on the trainer's own prepared
rows and its own collator, and says so; with TRL's collator (it masks padding by position)
the same trainer passes. Offline: the tiny model is built from a config, the tokenizer ships
inside forge.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

from forge.demo import builtin_tokenizer  # noqa: E402
from forge.doctor import check_trainer, format_checks  # noqa: E402


class MasksPadId:
    """The classic bug: labels at the pad id become -100 (and pad == EOS here)."""

    def __init__(self, pad_token_id: int) -> None:
        self.inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
        self.pad = pad_token_id

    def __call__(self, examples):
        batch = self.inner(examples)
        batch["labels"][batch["input_ids"] == self.pad] = -100
        return batch


def main() -> None:
    torch.set_num_threads(1)
    tokenizer = builtin_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # a tokenizer that ships without a pad token
    model = LlamaForCausalLM(LlamaConfig(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64,
                                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=128))
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(24)]
    args = trl.SFTConfig("outputs/doctor-example", max_length=64, report_to="none", use_cpu=True, bf16=False)
    for name, collator in (("hand-written collator", MasksPadId(tokenizer.pad_token_id)), ("TRL's collator", None)):
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(chats),
                                 processing_class=tokenizer, data_collator=collator)
        print(f"--- {name}")
        print(format_checks(check_trainer(trainer)))


if __name__ == "__main__":
    main()
