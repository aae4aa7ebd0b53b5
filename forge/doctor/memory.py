"""Will the configured batch fit? One step measured by the autotune memory model, against a budget.

The estimate is :class:`forge.autotune.probe.StepProbe` at the run's per-device batch and
longest sequence: one real forward, backward and optimizer step (at ``lr=0``, so the weights
do not move), counted exactly on any device (allocator high-water mark on CUDA). Memory the
step cannot see (the EMA shadow, the monitor's copy, a DPO reference model) is added. The
budget is ``--max-memory``, else the GPU's free memory, else (CPU) the machine's RAM.

Example:
    >>> check_memory(model, args, seq_len=512, max_memory="24GB")
    Check(name='memory', status='OK', message='one step at batch 8 x 512 tokens needs 9.1 GB of 24 GB ...')
"""

from __future__ import annotations

import os
from typing import Any

from forge.doctor.result import FAIL, OK, WARN, Check

HEADROOM = 0.9  # above this share of the budget, fragmentation may still push a run over


def machine_memory() -> int | None:
    """Physical RAM in bytes (None where the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def budget(max_memory: str | int | None, device: Any) -> tuple[int | None, str]:
    """Bytes one device may use, and where the figure came from."""
    from forge.autotune.data import parse_memory
    from forge.autotune.probe import budget_bytes

    if max_memory is not None:
        total = None
        if device.type == "cuda":
            import torch

            total = torch.cuda.mem_get_info(device)[1]
        return parse_memory(max_memory, total=total), "--max-memory"
    if device.type == "cuda":
        return budget_bytes(None, device), "free GPU memory"
    return machine_memory(), "the machine's RAM"


def step_bytes(model: Any, args: Any, seq_len: int, rows_per_example: int = 1) -> int | None:
    """Peak bytes of one training step at the run's per-device batch (None: out of memory)."""
    from forge.autotune.probe import StepProbe, as_trained, autocast_dtype, optimizer_factory

    device = next(model.parameters()).device
    # The same probe autotune uses (forge.core.memory: live tensors on CPU, the allocator on CUDA).
    probe = StepProbe(model, seq_len, optimizer_factory=optimizer_factory(args, model),
                      autocast_dtype=autocast_dtype(args), rows_per_example=rows_per_example,
                      accumulation_steps=2 if int(getattr(args, "gradient_accumulation_steps", 1) or 1) > 1 else 1,
                      max_grad_norm=getattr(args, "max_grad_norm", None))
    with as_trained(model, args, device):
        return probe(int(args.per_device_train_batch_size))


def check_memory(model: Any, args: Any, seq_len: int, max_memory: str | int | None = None,
                 reserved_bytes: int = 0, rows_per_example: int = 1) -> Check:
    """FAIL when one step at the configured batch does not fit the budget, WARN when it barely does.

    Args:
        model: the model as it will train (transformed, on its device).
        args: the run's training arguments (batch, optimizer, precision, checkpointing).
        seq_len: tokens per row (the longest the run meets).
        max_memory: the budget, e.g. ``"24GB"``; None: the device's memory.
        reserved_bytes: what other features hold beside the step.
        rows_per_example: 2 for DPO (chosen and rejected).
    """
    from forge.autotune.data import format_bytes

    device = next(model.parameters()).device
    limit, source = budget(max_memory, device)
    batch = int(args.per_device_train_batch_size)
    measured = step_bytes(model, args, seq_len, rows_per_example)
    what = f"one step at batch {batch} x {seq_len} tokens"
    data = {"batch": batch, "seq_len": seq_len, "budget": limit, "reserved": reserved_bytes,
            "step_bytes": measured, "device": str(device)}
    fix = ("lower per_device_train_batch_size (raising gradient_accumulation_steps keeps the global batch), "
           "enable gradient checkpointing or LoRA, or turn on autotune")
    if measured is None:
        return Check("memory", FAIL, f"{what} ran out of memory on {device}; {fix}", data=data)
    need = measured + reserved_bytes
    data["needed"] = need
    besides = f" (with {format_bytes(reserved_bytes)} other features hold)" if reserved_bytes else ""
    if limit is None:
        return Check("memory", WARN, f"{what} needs {format_bytes(need)}{besides}; the machine's memory cannot be "
                     "read here: give --max-memory to compare", data=data)
    share = need / limit
    message = f"{what} needs {format_bytes(need)}{besides} of {format_bytes(limit)} ({source}, {100 * share:.0f}%)"
    if share > 1:
        return Check("memory", FAIL, f"{message}: it will not fit; {fix}", data=data)
    if share > HEADROOM:
        return Check("memory", WARN, f"{message}: fragmentation may still push it over", data=data)
    return Check("memory", OK, message, data=data)
