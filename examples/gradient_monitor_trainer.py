"""Watch a fine-tune's gradients with forge's GradientMonitor: offline, tiny Llama, < 30 s on CPU.

    python examples/gradient_monitor_trainer.py --output-dir /tmp/monitor-demo

A NaN is injected into one weight's gradient at step 12 to show the default ``skip`` policy:
that update is skipped (weights and optimizer state untouched), training goes on, and the
end-of-run table names the parameter. Per-block metrics reach every ``report_to`` tracker
(try ``--report-to tensorboard``); the JSON summary lands in the output directory.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally

import torch
from datasets import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from forge.monitor import GradientMonitor

BAD_PARAM = "model.layers.1.mlp.down_proj.weight"


class InjectNaN(TrainerCallback):
    """Poisons one parameter's gradient at one optimizer step (a stand-in for a real fault)."""

    def __init__(self, model: torch.nn.Module, name: str, step: int):
        self.step, self.current = step, 0
        param = dict(model.named_parameters())[name]
        param.register_hook(lambda g: g * float("nan") if self.current == self.step else g)

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = state.global_step + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/gradient-monitor-demo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--report-to", default="none", help="e.g. tensorboard, wandb, mlflow")
    cli = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matmuls: threads cost more than they give
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    # Counting sequences: a pattern the model can learn in a few dozen steps.
    starts = torch.randint(0, 96, (64, 1))
    ids = (starts + torch.arange(32)) % 128
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    monitor = GradientMonitor(on_spike="warn", on_explode="warn")  # on_nonfinite="skip" default
    args = TrainingArguments(cli.output_dir, max_steps=cli.steps, per_device_train_batch_size=8,
                             learning_rate=3e-3, logging_steps=5, save_strategy="no",
                             report_to=cli.report_to, disable_tqdm=True,
                             dataloader_pin_memory=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[monitor, InjectNaN(model, BAD_PARAM, step=12)])
    trainer.train()

    last = trainer.state.log_history[-2]  # the last training log, before the run totals
    print("last log:", {k: round(v, 4) for k, v in last.items() if k.startswith("forge/")})
    print("skipped steps:", monitor.skipped_steps)


if __name__ == "__main__":
    main()
