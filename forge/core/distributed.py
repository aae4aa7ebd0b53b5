"""Distributed helpers every feature shares: who is rank 0, how many ranks, FSDP2 shards.

Readable before ``torch.distributed`` is initialised (then it is one process, or rank from the
launcher's environment). Under FSDP2 (``fully_shard``) parameters are ``DTensor``s: features
work on the rank-local shard (:func:`local_view`) and gather full tensors only to save
(:func:`gather_full`, a collective).
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


@dataclass(frozen=True)
class ShardSpec:
    """Enough of a ``DTensor``'s layout to rebuild it around a local shard."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]


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
