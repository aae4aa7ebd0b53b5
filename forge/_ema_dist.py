"""Distributed plumbing for :mod:`forge.ema`: unwrapping, FSDP2 shards, and who may write.

Private. Under DDP and DeepSpeed ZeRO-1/2 every rank holds full, identical parameters, so the
EMA needs no communication at all. Under FSDP2 (``fully_shard``) parameters are ``DTensor``s;
the EMA keeps only the local shard and gathers full tensors for saving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ShardSpec:
    """Enough of a ``DTensor``'s layout to rebuild it around a local EMA shard."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers,
    so parameter names are the same whichever of them the caller hands over."""
    while True:
        name = type(model).__name__
        if name in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4
        return None
    return DTensor


def shard_spec(tensor: torch.Tensor) -> ShardSpec | None:
    """The layout of ``tensor`` if it is a ``DTensor``, else ``None``."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(tensor, dtensor):
        return None
    return ShardSpec(tensor.device_mesh, tuple(tensor.placements), tensor.shape, tuple(tensor.stride()))


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor behind ``tensor`` (itself unless it is a ``DTensor``)."""
    return tensor.to_local() if shard_spec(tensor) is not None else tensor


def gather_full(local: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """All ranks call this; every rank gets the full tensor (a collective)."""
    from torch.distributed.tensor import DTensor

    device = torch.device(spec.mesh.device_type)
    local = local.to(device) if local.device.type != device.type else local
    dt = DTensor.from_local(local, spec.mesh, spec.placements, shape=spec.shape, stride=spec.stride)
    return dt.full_tensor()


def shard_full(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """This rank's shard of a full tensor, cut locally (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    device = torch.device(spec.mesh.device_type)
    dt = distribute_tensor(full.to(device), spec.mesh, list(spec.placements), src_data_rank=None)
    return dt.to_local()


def is_main_process() -> bool:
    """True on rank 0, or when ``torch.distributed`` is not initialised."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def check_supported(model: nn.Module) -> None:
    """Refuse layouts whose parameters are not what they look like, instead of averaging garbage.

    Raises:
        NotImplementedError: for FSDP1 flat parameters and DeepSpeed ZeRO-3 partitions.
    """
    for module in model.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            raise NotImplementedError(
                "forge.ema supports FSDP2 (torch.distributed.fsdp.fully_shard, accelerate "
                "fsdp_version: 2); FSDP1 flattens parameters, so the EMA would track rank-local "
                "flat buffers. Switch to fsdp_version 2."
            )
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            raise NotImplementedError(
                "forge.ema does not yet gather DeepSpeed ZeRO-3 partitions; use ZeRO-1/2 (full "
                "parameters on every rank, works like DDP) or FSDP2."
            )
        break
