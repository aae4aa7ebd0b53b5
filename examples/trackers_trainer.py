"""Forge's TensorBoard tracker and run report on a plain HF Trainer: offline, tiny Llama, < 30 s.

    python examples/trackers_trainer.py --output-dir /tmp/trackers-demo
    tensorboard --logdir /tmp/trackers-demo/runs        # scalars, histograms, the preset
    open /tmp/trackers-demo/report/report.html          # the same run, no tracker needed

The gradient monitor and EMA evaluation feed forge figures into the logs; the TensorBoard
callback adds per-block gradient histograms and the preset (its fake token is redacted);
``forge.report`` then draws the run from its own files. ``--inject-nan-at 12`` poisons one
gradient at step 12 to show how an anomaly is marked (the monitor skips that update).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally

import torch
import yaml
from datasets import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from forge.ema import EMACallback
from forge.monitor import GradientMonitor
from forge.report import write_report
from forge.trackers import ForgeTensorBoardCallback


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
    parser.add_argument("--output-dir", default="outputs/trackers-demo")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--inject-nan-at", type=int, default=0, help="step to poison (0: none)")
    cli = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matmuls: threads cost more than they give
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    # Counting sequences: a pattern the model can learn in a few dozen steps.
    starts = torch.randint(0, 96, (160, 1))
    ids = ((starts + torch.arange(32)) % 128).tolist()
    train = Dataset.from_dict({"input_ids": ids[:128], "labels": ids[:128]})
    held_out = Dataset.from_dict({"input_ids": ids[128:], "labels": ids[128:]})

    settings = {"learning_rate": 3e-3, "max_steps": cli.steps, "per_device_train_batch_size": 8,
                "logging_steps": 3, "eval_steps": 15}
    # What a preset would hold; a token pasted by mistake never reaches the tracker.
    preset_yaml = yaml.safe_dump({"method": "sft", "training": {**settings,
                                  "hub_token": "hf_" + "x" * 34}}, sort_keys=False)
    args = TrainingArguments(cli.output_dir, eval_strategy="steps", save_strategy="no",
                             report_to="none",  # forge's callback replaces the stock one
                             disable_tqdm=True, dataloader_pin_memory=False, seed=0, **settings)
    callbacks = [GradientMonitor(), EMACallback(decay=0.9, eval_with_ema=True),
                 ForgeTensorBoardCallback(histogram_every=10, run_name="tiny-llama",
                                          preset_yaml=preset_yaml)]
    if cli.inject_nan_at:
        callbacks.append(InjectNaN(model, "model.layers.2.mlp.down_proj.weight", cli.inject_nan_at))
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                      callbacks=callbacks)
    trainer.train()
    # `forge train` writes this file; a plain Trainer keeps it only in checkpoints.
    trainer.state.save_to_json(os.path.join(cli.output_dir, "trainer_state.json"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(cli.output_dir, "runs", "tiny-llama"))
    events.Reload()
    tags = events.Tags()
    print(f"TensorBoard: {len(tags['scalars'])} scalar series, "
          f"{len(tags['histograms'])} gradient histograms ({', '.join(tags['histograms'][:3])}, "
          f"...), text: {', '.join(t.split('/text_summary')[0] for t in tags['tensors'])}")
    print("report:", write_report(cli.output_dir))


if __name__ == "__main__":
    main()
