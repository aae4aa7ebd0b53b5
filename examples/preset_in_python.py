"""Use a forge preset from your own TRL code: the preset gives you the real config objects.

    python examples/preset_in_python.py

Runs offline in ~15 s on CPU: the bundled tiny Llama, the bundled demo chats, forge's
`lora` preset with a few overrides, and an ordinary `trl.SFTTrainer` you control.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import trl  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import forge  # noqa: E402
from forge.demo import builtin_model_dir  # noqa: E402
from forge.recipes.data import load_examples  # noqa: E402

out = tempfile.mkdtemp()
preset = forge.load_preset("lora", {
    "training.max_steps": 10,
    "training.logging_steps": 2,
    "training.learning_rate": 5e-3,
    "training.per_device_train_batch_size": 8,
    "training.output_dir": out,
    "data.max_length": 64,
})
args = preset.training_args()        # a real trl.SFTConfig
lora = preset.peft_config()          # a real peft.LoraConfig

model_dir = builtin_model_dir()      # swap in any local model directory or Hub name
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora)
train_data = load_examples("builtin:demo-sft", max_samples=80)  # or your own .jsonl

trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train_data,
                         processing_class=tokenizer)
trainer.train()
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print(f"lora preset in plain TRL: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
