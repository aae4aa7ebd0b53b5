"""One run of every forge feature together, under a launcher; `tests/test_distributed.py` runs it.

    python tests/_dist_worker.py single-gradual OUT                     # the reference: 1 process
    torchrun --nproc_per_node 2 tests/_dist_worker.py ddp OUT           # or accelerate launch
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/_dist_worker.py zero2 OUT

The global batch is 8 whatever the number of processes (4 per step across ranks x 2 micro-
batches). EMA, the monitor (skip on non-finite; a NaN is put into the last rank's head gradient
at step 3), the freeze schedule (a static freeze under DeepSpeed, which refuses schedules), the
focal loss and TensorBoard with histograms every 2 steps are on. The run saves at step 2, then
a second run resumes from that checkpoint into another directory (not in the one-process
reference, whose uninterrupted run is all the tests compare with). Each rank writes
``rank<r>.json``: what its monitor skipped and the histograms it computed.
"""

from __future__ import annotations

import json
import os
import sys

mode, out = sys.argv[1], sys.argv[2]
if mode.startswith("zero"):
    # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce on first use (a minute
    # on a small machine); gloo does the same job for a test.
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import forge.trackers.base as tracker_base  # noqa: E402
from forge.config.loader import load_preset  # noqa: E402
from forge.recipes import runner  # noqa: E402

world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
hists: list[dict] = []  # the current run's
_compute = tracker_base.HistogramTap.compute


def spy(self, *args, **kwargs):
    """What every rank's tracker tap computes (rank 0 logs it)."""
    found = _compute(self, *args, **kwargs)
    hists.append({k: {"num": v["num"], "sum": v["sum"], "min": v["min"], "max": v["max"]} for k, v in found.items()})
    return found


tracker_base.HistogramTap.compute = spy


class NaNAtStep3(TrainerCallback):
    """A NaN in the gradient of the last trainable tensor, on the last rank only, at step 3."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.step = state.global_step + 1
        if self.step == 3 and not hasattr(self, "hook") and rank == world - 1:
            param = [p for p in model.parameters() if p.requires_grad][-1]
            self.hook = param.register_hook(lambda g: g * float("nan") if self.step == 3 else g)


def preset(output_dir: str):
    freeze = ({"enabled": True, "schedule": "gradual", "every_n_steps": 2} if mode.endswith("gradual") or mode == "ddp"
              else {"enabled": True, "ratio": 0.5})
    overrides = {
        "model.name_or_path": "builtin:tiny-llama", "data.max_samples": 32, "data.max_length": 48,
        "training.max_steps": 4, "training.per_device_train_batch_size": 4 // world,
        "training.gradient_accumulation_steps": 2, "training.logging_steps": 1, "training.learning_rate": 1e-2,
        "training.save_strategy": "steps", "training.save_steps": 2, "training.output_dir": output_dir,
        "training.ddp_find_unused_parameters": True, "training.max_grad_norm": 1.0,
        "ema": {"enabled": True, "decay": 0.7},
        "monitor": {"enabled": True, "log_every": 1, "on_nonfinite": "skip"},
        "freeze": freeze, "loss": {"strategy": "focal", "gamma": 2.0, "fused": True},
        "trackers": {"tensorboard": {"histogram_every": 2}},
    }
    if mode.startswith("zero"):
        zero: dict = {"stage": int(mode[-1])}
        if mode == "zero3":
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        overrides["training.deepspeed"] = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
                                           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    return load_preset("demo", overrides)


real_build = runner._build


def build(config, resume):
    trainer = real_build(config, resume)
    trainer.add_callback(NaNAtStep3())
    return trainer


runner._build = build
report: dict = {}
runs = [("full", False), ("resumed", os.path.join(out, "full", "checkpoint-2"))]
for name, resume in runs[:1] if mode.startswith("single") else runs:  # the reference: no resume
    hists.clear()
    result = runner.train(preset(os.path.join(out, name)), resume=resume)
    monitor = next(c for c in result.trainer.callback_handler.callbacks if type(c).__name__ == "GradientMonitor")
    report[name] = {"skipped": list(monitor.skipped_steps), "history": monitor.history, "hists": list(hists)}
with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
    json.dump(report, fh)
if world > 1:
    torch.distributed.barrier()
