"""Distributed helpers every feature shares: ranks, collectives, and shard-aware access.

Readable before ``torch.distributed`` is initialised (then it is one process, or rank from the
launcher's environment). Features never read ``p.grad`` or ``p`` directly when a run may be
sharded; they ask this module for the rank-local part:

* **DDP, DeepSpeed ZeRO-1/2 weights**: every rank holds the full, identical tensor;
* **FSDP2** (``fully_shard``): parameters and gradients are ``DTensor``s; the local shard is
  ``to_local()``;
* **DeepSpeed ZeRO-1/2 gradients**: partitioned between ranks after the reduction; the local
  fragment is what DeepSpeed's ``safe_get_full_grad`` would contribute before its all-reduce;
* **DeepSpeed ZeRO-3**: weights are partitioned (``ds_tensor``, padded to equal partitions) and
  gradients too (``deepspeed.utils.safe_get_local_grad``).

A statistic over a sharded model is a sum of per-rank parts: every rank computes its part and
all of them call :func:`all_reduce_` together (a collective). :func:`gather_full` and
:func:`shard_full` turn a rank-local tensor into the full one and back, for saving and loading.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch


def _dist() -> Any | None:
    """``torch.distributed`` when it is initialised, else None (never imports it anew)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def rank() -> int:
    """This process's global rank (the launcher's ``RANK`` before initialisation)."""
    dist = _dist()
    return dist.get_rank() if dist is not None else int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """Number of processes (the launcher's ``WORLD_SIZE`` before initialisation)."""
    dist = _dist()
    return dist.get_world_size() if dist is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    """True on rank 0, or in a single process."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over all ranks (``sum``, ``max`` or ``min``); every rank must
    call it. A no-op in one process. Returns ``tensor``.

    Example:
        >>> all_reduce_(torch.ones(2)).tolist()  # one process: unchanged
        [1.0, 1.0]
    """
    dist = _dist()
    if dist is None or dist.get_world_size() < 2:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dist.all_reduce(tensor, op=ops[op])
    return tensor


# -- what kind of tensor ------------------------------------------------------------------------
def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4
        return None
    return DTensor


def is_dtensor(tensor: Any) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def is_zero3(tensor: Any) -> bool:
    """A DeepSpeed ZeRO-3 partitioned parameter (its data lives in ``ds_tensor``)."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_tensor")


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor``'s weights are split between ranks (FSDP2 or ZeRO-3)."""
    return is_dtensor(tensor) or is_zero3(tensor)


def grads_partitioned(params: list[Any]) -> bool:
    """Whether gradients of ``params`` are split between ranks (FSDP2, ZeRO-1/2/3) rather than
    full and identical on every rank (one process, DDP)."""
    return any(is_sharded(p) or hasattr(p, "_hp_mapping") for p in params)


def numel(param: Any) -> int:
    """Elements of the whole parameter (a ZeRO-3 parameter's own tensor is empty)."""
    return int(param.ds_numel) if is_zero3(param) else int(param.numel())


def _zero3_valid(param: Any) -> int:
    """How many elements of this rank's (padded) ZeRO-3 partition belong to the parameter."""
    part = param.ds_tensor.numel()
    me = torch.distributed.get_rank(getattr(param, "ds_process_group", None))
    return max(0, min(part, int(param.ds_numel) - me * part))


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local data behind a parameter: the ``DTensor`` shard, the ZeRO-3 partition
    (padding left out, flat), or the tensor itself. Writing into it writes the parameter."""
    if is_dtensor(tensor):
        return tensor.to_local()
    if is_zero3(tensor):
        return tensor.ds_tensor.narrow(0, 0, _zero3_valid(tensor))
    return tensor


def local_grad(param: Any) -> torch.Tensor | None:
    """This rank's part of ``param``'s gradient, or None when it has none here.

    Under ZeRO-1/2 the gradient fragments exist between the reduction and the optimizer step
    (DeepSpeed's own rule for ``safe_get_full_grad``), so call this from inside that window.
    """
    if is_zero3(param):
        from deepspeed.utils import safe_get_local_grad

        grad = safe_get_local_grad(param)
        return None if grad is None else grad.reshape(-1).narrow(0, 0, _zero3_valid(param))
    mapping = getattr(param, "_hp_mapping", False)
    if mapping is not False and param.grad is None:  # ZeRO-1/2: the fragment this rank owns
        if mapping is None:
            return None
        grad = mapping.get_lp_grad_fragment(param._index_in_param_group).reshape(-1)
        address = mapping.lp_fragment_address
        if grad.numel() == param.numel() and address.numel != param.numel():
            grad = grad.narrow(0, address.start, address.numel)  # a full buffer: our fragment only
        return grad
    grad = param.grad
    if grad is None:
        return None
    return grad.to_local() if is_dtensor(grad) else grad


# -- full tensors and back ----------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSpec:
    """Enough of a sharded tensor's layout to rebuild it around a local part.

    ``kind`` is ``"dtensor"`` (FSDP2: ``mesh``, ``placements``, ``stride``) or ``"zero3"``
    (DeepSpeed: ``partition`` elements per rank, ``group`` the process group).
    """

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]
    kind: str = "dtensor"
    partition: int = 0
    group: Any = None


def shard_spec(tensor: torch.Tensor) -> ShardSpec | None:
    """The layout of ``tensor`` if it is sharded (FSDP2 ``DTensor`` or ZeRO-3), else ``None``."""
    if is_dtensor(tensor):
        return ShardSpec(tensor.device_mesh, tuple(tensor.placements), tensor.shape, tuple(tensor.stride()))
    if is_zero3(tensor):
        shape = torch.Size(tensor.ds_shape)
        return ShardSpec(None, (), shape, (), kind="zero3", partition=tensor.ds_tensor.numel(),
                         group=getattr(tensor, "ds_process_group", None))
    return None


def gather_full(local: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """All ranks call this; every rank gets the full tensor (a collective)."""
    if spec.kind == "zero3":
        dist = torch.distributed
        padded = local.new_zeros(spec.partition)
        padded[: local.numel()] = local.reshape(-1)
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(spec.group))]
        dist.all_gather(parts, padded, group=spec.group)
        return torch.cat(parts)[: spec.shape.numel()].view(spec.shape)
    from torch.distributed.tensor import DTensor

    device = torch.device(spec.mesh.device_type)
    local = local.to(device) if local.device.type != device.type else local
    dt = DTensor.from_local(local, spec.mesh, spec.placements, shape=spec.shape, stride=spec.stride)
    return dt.full_tensor()


def shard_full(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """This rank's part of a full tensor, cut locally (no communication)."""
    if spec.kind == "zero3":
        me = torch.distributed.get_rank(spec.group)
        flat = full.reshape(-1)
        start = min(me * spec.partition, flat.numel())
        return flat[start: start + spec.partition].clone()
    from torch.distributed.tensor import distribute_tensor

    device = torch.device(spec.mesh.device_type)
    dt = distribute_tensor(full.to(device), spec.mesh, list(spec.placements), src_data_rank=None)
    return dt.to_local()


# -- DeepSpeed: the window where gradients exist --------------------------------------------------
_PRE_STEP = "_forge_pre_step_hooks"


def deepspeed_engine(trainer: Any) -> Any | None:
    """The DeepSpeed engine a ``Trainer`` trains with (None without DeepSpeed)."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    engine = getattr(trainer, "deepspeed", None) or getattr(trainer, "model_wrapped", None)
    return engine if hasattr(engine, "optimizer") and hasattr(engine, "backward") else None


def before_deepspeed_step(engine: Any, hook: Any) -> Any:
    """Call ``hook()`` inside DeepSpeed's optimizer step, while the gradients still exist.

    Under DeepSpeed the whole optimizer step (reduction, clipping, update, ``zero_grad``) runs
    inside ``accelerator.backward`` of the last micro-batch, before the Trainer's
    ``on_pre_optimizer_step``; ZeRO's gradient fragments exist only between the reduction and
    the ZeRO optimizer's ``step``. Every hook runs there, on every rank, in the order added;
    when one returns ``False`` the update is held back and reported to the engine as an
    overflow, which is how DeepSpeed itself skips a step (no update, no LR-scheduler step,
    gradients zeroed).

    Returns:
        A function that removes the hook (the wrapper goes when the last one does).
    """
    optimizer = engine.optimizer
    hooks = vars(optimizer).get(_PRE_STEP)
    if hooks is None:
        hooks = []
        original = optimizer.step
        forced = {"on": False}

        def step(*args: Any, **kwargs: Any) -> Any:
            if forced["on"]:  # our own overflow flag from the last skipped step
                optimizer.overflow, forced["on"] = False, False
            verdicts = [h() for h in list(hooks)]
            if any(v is False for v in verdicts):
                optimizer.overflow, forced["on"] = True, True
                return None
            return original(*args, **kwargs)

        optimizer.step = step
        setattr(optimizer, _PRE_STEP, hooks)
    hooks.append(hook)

    def remove() -> None:
        if hook in hooks:
            hooks.remove(hook)
        if not hooks and vars(optimizer).get(_PRE_STEP) is hooks:
            del optimizer.step  # the instance attribute; the class's step shows again
            delattr(optimizer, _PRE_STEP)

    return remove


def deepspeed_grad_scaling(engine: Any) -> tuple[float, float]:
    """``(loss_scale, clip)`` DeepSpeed applies to the gradients inside its step, after the
    hooks of :func:`before_deepspeed_step` ran: it divides by the fp16 loss scale (1 in bf16 and
    fp32), then clips to ``clip`` (0: no clipping). Readers that see the gradients there use
    this to report what the update is made of, as they would after the Trainer's clipping.
    """
    optimizer = engine.optimizer
    scale = float(getattr(optimizer, "loss_scale", 1.0) or 1.0)
    clip = getattr(optimizer, "clip_grad", None)
    if clip is None:
        getter = getattr(engine, "gradient_clipping", None)
        clip = getter() if callable(getter) else 0.0
    return scale, float(clip or 0.0)


def sharding_strategy(args: Any, env: Any = None) -> str | None:
    """``"fsdp"``, ``"deepspeed"`` or None: what a Trainer run with ``args`` will shard with,
    set in the training arguments or by ``accelerate launch`` (its config file and its
    ``--use_fsdp`` / ``--use_deepspeed`` reach the processes as ``ACCELERATE_USE_*``).

    Example:
        >>> sharding_strategy(None, {"ACCELERATE_USE_DEEPSPEED": "true"})
        'deepspeed'
    """
    env = os.environ if env is None else env

    def on(name: str) -> bool:
        return str(env.get(name, "")).strip().lower() in ("1", "true", "yes")

    if getattr(args, "deepspeed", None) or on("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if getattr(args, "fsdp", None) or on("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return None


def count_cpu_deepspeed_ranks() -> None:
    """Make accelerate count every process of a DeepSpeed run on CPU (``DS_ACCELERATOR=cpu``).

    accelerate's ``PartialState`` finds no backend when neither ``use_cpu`` (which would drop
    DeepSpeed) nor a GPU is there, and then takes the run for ONE process although DeepSpeed
    has set up all of them: every rank would get the same batches and ``gather`` would fail.
    Call after the training arguments are made; the state is shared, so fixing it once is
    enough. A no-op unless ``torch.distributed`` runs with several processes.
    """
    dist = _dist()
    if dist is None or dist.get_world_size() < 2:
        return
    from accelerate import PartialState

    state = PartialState()
    if getattr(state, "backend", None) is None and state.num_processes == 1:
        state.backend = dist.get_backend()
        state.num_processes = dist.get_world_size()
        state.process_index = dist.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", state.process_index))
