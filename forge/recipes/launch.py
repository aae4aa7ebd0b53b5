"""Launch mistakes caught before anything heavy loads: each one line, from rank 0, exit 2.

Each of these used to run to the end and train something else than asked, with no word:

* ``accelerate launch --cpu --num_processes N`` starts ONE process (accelerate's multi-CPU
  launch needs ``mpirun``); it would train alone on all the data;
* FSDP on a machine without an accelerator (or with ``use_cpu``): accelerate promotes only GPU
  launches to FSDP, so it would train plain DDP with a full copy of the model on every rank;
* DeepSpeed with ``use_cpu``: accelerate drops DeepSpeed the same way;
* autotune under FSDP or DeepSpeed, set in the preset or by ``accelerate launch`` (its config
  file or ``--use_deepspeed`` / ``--use_fsdp`` reach the processes as ``ACCELERATE_USE_*``);
* a freeze schedule under DeepSpeed: ZeRO's optimizer runs on flat partitions with one step
  count, so a block switched on later would train with other moments than in one process;
* ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save``: the final directory would
  hold no weights.

Example:
    >>> check_launch(args, features={"ema": cfg}, env={})  # raises ForgeError on a mistake
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from forge.core.distributed import sharding_strategy
from forge.errors import ForgeError


def _flag(env: Mapping[str, str], name: str) -> bool:
    return str(env.get(name, "")).strip().lower() in ("1", "true", "yes")


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def deepspeed_config(args: Any, env: Mapping[str, str]) -> dict[str, Any] | None:
    """The DeepSpeed configuration a run will use (preset's ``deepspeed`` or accelerate's file)."""
    source = getattr(args, "deepspeed", None) or env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if isinstance(source, dict):
        return source
    if isinstance(source, str) and source not in ("", "none") and os.path.isfile(source):
        try:
            with open(source, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None  # DeepSpeed reports its own file's problems
    return None


def check_launch(args: Any, features: Mapping[str, Any], env: Mapping[str, str] | None = None) -> None:
    """Raise :class:`~forge.errors.ForgeError` for a launch that would not train what was asked.

    Args:
        args: the run's training arguments.
        features: the enabled feature sections by name (``ema``, ``freeze``, ``autotune``...).
        env: the environment (default ``os.environ``).
    """
    env = os.environ if env is None else env
    multi_cpu = (_flag(env, "ACCELERATE_USE_CPU") and "MASTER_ADDR" in env and "WORLD_SIZE" not in env
                 and not any(k in env for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")))
    if multi_cpu:
        raise ForgeError(
            "accelerate launch --cpu with several processes starts only one without mpirun, which "
            "would train alone on all the data; on CPU launch with `torchrun --nproc_per_node N -m "
            "forge train ...` or `accelerate launch --multi_gpu --num_processes N -m forge train ...`")
    strategy = sharding_strategy(args, env)
    on_cpu = bool(getattr(args, "use_cpu", False)) or not _has_accelerator()
    if strategy == "fsdp" and on_cpu:
        raise ForgeError(
            "training.fsdp: accelerate runs FSDP on GPUs only; on CPU it would drop FSDP and train "
            "plain DDP with a full model per process. Remove fsdp here (or train on GPUs)")
    if strategy == "deepspeed" and getattr(args, "use_cpu", False):
        raise ForgeError(
            "training.use_cpu: accelerate drops DeepSpeed when use_cpu is on; remove use_cpu "
            "(DeepSpeed runs on CPU with DS_ACCELERATOR=cpu)")
    if strategy is not None and "autotune" in features:
        raise ForgeError(
            f"autotune: {'FSDP' if strategy == 'fsdp' else 'DeepSpeed'} shards the model, which the "
            "probes do not model yet; set per_device_train_batch_size by hand or turn autotune off")
    if strategy == "deepspeed":
        freeze = features.get("freeze")
        if freeze is not None and getattr(freeze, "schedule", None):
            raise ForgeError(
                "freeze.schedule: under DeepSpeed, ZeRO updates flat partitions with one step count, "
                "so a block switched on later would not train as in one process; use a static "
                "freeze (no schedule) or DDP")
        zero = (deepspeed_config(args, env) or {}).get("zero_optimization") or {}
        stage = zero.get("stage", env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"))
        gathered = zero.get("stage3_gather_16bit_weights_on_model_save",
                            _flag(env, "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"))
        if str(stage) == "3" and not gathered:
            raise ForgeError(
                "deepspeed: ZeRO-3 without \"stage3_gather_16bit_weights_on_model_save\": true would "
                "leave the output directory without model weights; add it to the DeepSpeed config")
