"""Exact tensor-memory accounting on any device, CPU included.

``LiveBytes`` counts the bytes of every tensor storage created while it is active (forward,
backward and optimizer kernels alike: it sits under autograd as a ``TorchDispatchMode``) and
subtracts them when the storage is freed, so its ``peak`` is the true high-water mark of tensor
memory without a caching allocator in the way. Used by ``suggest_freeze`` and ``autotune``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Track live and peak bytes of tensor storages created inside the context.

    Args:
        ignore: tensors that already exist (parameters, inputs); views of them are not counted.
    """

    def __init__(self, ignore: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._ignore = {t.untyped_storage()._cdata for t in ignore}
        self._refs: dict[int, Any] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)

    def reset_peak(self) -> None:
        """Start a new peak measurement from the current live bytes."""
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._refs or key in self._ignore:
                continue
            nbytes = storage.nbytes()
            self.live += nbytes
            # The callback fires when the storage dies, wherever that happens.
            self._refs[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n))
        self.peak = max(self.peak, self.live)
        return out
