"""The EMA itself: :class:`EMAWeights`, plain PyTorch (the Trainer side is :mod:`forge.ema.callback`)."""

from __future__ import annotations

import json
import logging
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from forge.core.distributed import (
    all_reduce_,
    gather_full,
    is_main_process,
    local_view,
    shard_full,
    shard_spec,
)
from forge.core.unwrap import strip_wrappers
from forge.ema.distributed import check_supported
from forge.ema.plan import (
    Plan,
    blend_,
    build_plan,
    copy_pairs_,
    finish_stage_,
    stage_,
    tracked_tensors,
)
from forge.ema.schedule import as_dtype, check_settings, step_decay

logger = logging.getLogger("forge.ema")


class EMAWeights:
    """An exponential moving average of a model's trainable weights.

    ``ema = decay * ema + (1 - decay) * weights`` after each optimizer step, done as one fused
    ``torch._foreach_lerp_`` over all tracked tensors, with no host-device sync. By default only
    parameters with ``requires_grad`` are tracked, so on a PEFT LoRA model the EMA costs one copy
    of the adapter, not of the base model.

    Create it after the model is on its device (and after ``fully_shard`` under FSDP2, or
    ``deepspeed.initialize`` under ZeRO-3, so it holds local shards); DDP wrapping may come
    before or after, the wrapper is looked through. Under DDP and ZeRO-1/2 every rank computes
    the same EMA without communication; under FSDP2 and ZeRO-3 each rank averages its own
    partition, and saving gathers the full tensors (a collective: call it on every rank).

    Args:
        model: the model whose weights to average. The EMA starts as a copy of its weights.
        decay: weight of the old average per optimizer step; the average spans about
            ``1 / (1 - decay)`` steps (0.999 ~ 1000 steps).
        update_every: average every ``k`` optimizer steps with decay ``decay ** k``, so the
            average means the same thing at ``1/k`` of the cost.
        update_after_step: copy the weights (no averaging) for the first this many steps.
        warmup: ``None`` (fixed decay), ``"hyperbolic"`` (``min(decay, (1+u)/(10+u))``) or
            ``"power"`` (``1 - (1 + u/inv_gamma) ** -power``, clamped to ``[min_decay, decay]``),
            where ``u`` counts averaged steps; both let early weights fade quickly.
        inv_gamma: time scale of the ``"power"`` warm-up.
        power: exponent of the ``"power"`` warm-up (2/3 for very long runs, 3/4 for shorter ones).
        min_decay: lower clamp of the warm-up decay.
        include_frozen: also average frozen floating-point parameters (full-model EMA under LoRA).
        include_buffers: also track buffers (floating ones averaged, integer ones copied).
        device: where the EMA lives; ``"cpu"`` spares accelerator memory (updates then copy the
            weights to pinned host memory without blocking and average on the next update).
            ``None``: next to each parameter.
        dtype: EMA storage dtype; float32 by default even for bf16/fp16 models, whose
            8/11-bit mantissas cannot hold a ``1e-3`` step, so a low-precision EMA stops moving.
            ``"auto"`` / ``None`` keeps each parameter's dtype.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> ema = EMAWeights(model, decay=0.9)
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> ema.update(model)
        >>> torch.allclose(ema.shadow["weight"], model.weight - 0.9)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        *,
        update_every: int = 1,
        update_after_step: int = 0,
        warmup: str | None = None,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
        include_frozen: bool = False,
        include_buffers: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = torch.float32,
    ) -> None:
        errors = check_settings(
            decay=decay, update_every=update_every, update_after_step=update_after_step, warmup=warmup,
            inv_gamma=inv_gamma, power=power, min_decay=min_decay,
        )  # fmt: skip
        if errors:
            raise ValueError("invalid EMA settings: " + "; ".join(errors))
        self.decay = float(decay)
        self.update_every = int(update_every)
        self.update_after_step = int(update_after_step)
        self.warmup = warmup
        self.inv_gamma = float(inv_gamma)
        self.power = float(power)
        self.min_decay = float(min_decay)
        self.include_frozen = include_frozen
        self.include_buffers = include_buffers
        self.device = torch.device(device) if device is not None else None
        self.dtype = as_dtype(dtype)
        self.step = 0  # optimizer steps seen
        self.num_updates = 0  # averaging updates applied

        model = strip_wrappers(model)
        check_supported(model)
        pairs = tracked_tensors(model, include_frozen, include_buffers)
        if not pairs:
            raise ValueError("the model has no trainable floating-point parameters to average")
        self._names = [name for name, _ in pairs]
        self._specs = [shard_spec(t) for _, t in pairs]
        self._shadow = [self._new_shadow(local_view(t)) for _, t in pairs]
        self._plan: Plan | None = None
        self._plan_model: weakref.ref | None = None
        self._pending: float | None = None  # weight of a staged update not yet folded in

    def _new_shadow(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if (self.dtype is not None and t.is_floating_point()) else t.dtype
        return t.detach().to(device=self.device or t.device, dtype=dtype, copy=True)

    # -- the maths ---------------------------------------------------------------------------
    def get_decay(self, step: int) -> float:
        """Decay of the averaging update made at optimizer step ``step`` (``decay ** update_every``
        compensated; 0.0, i.e. a copy, up to ``update_after_step``).

        Example:
            >>> EMAWeights(torch.nn.Linear(2, 2), 0.99, update_every=2).get_decay(2) == 0.99**2
            True
        """
        d = step_decay(
            step, decay=self.decay, update_after_step=self.update_after_step, warmup=self.warmup,
            inv_gamma=self.inv_gamma, power=self.power, min_decay=self.min_decay,
        )  # fmt: skip
        return d**self.update_every

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Fold the model's current weights in; call once after each optimizer step.

        Args:
            model: the model being trained (DDP/compile wrappers are fine).
            step: the optimizer step just taken (1-based); defaults to one past the last.

        Example:
            >>> model = torch.nn.Linear(2, 2); ema = EMAWeights(model)
            >>> ema.update(model); ema.step
            1
        """
        self.step = self.step + 1 if step is None else int(step)
        since = self.step - self.update_after_step
        if since > 0 and since % self.update_every:
            return
        self._fold(model, 1.0 - self.get_decay(self.step))
        if since > 0:
            self.num_updates += 1

    def _fold(self, model: nn.Module, weight: float) -> None:
        self._flush()
        plan = self._plan_for(model)
        local = None if not plan.sharded else plan.locals()
        for group in plan.groups:
            src = plan.model_side(group, local)
            if not group.average:  # integer buffers (e.g. BatchNorm's counter) follow the model
                copy_pairs_(group.shadow, src)
            elif group.staging is not None:
                stage_(group, src)
                self._pending = weight
            else:
                blend_(group.shadow, src, weight, group.same_dtype)

    def _flush(self) -> None:
        """Finish a staged (off-device) update before anyone reads the EMA."""
        if self._pending is None or self._plan is None:
            return
        weight, self._pending = self._pending, None
        for group in self._plan.groups:
            if group.staging is not None:
                finish_stage_(group, weight)

    def _plan_for(self, model: nn.Module) -> Plan:
        # Keyed by the object the caller passes (wrapper or not): the hot path is one identity check.
        if self._plan is None or self._plan_model is None or self._plan_model() is not model:
            self._flush()
            self._plan = build_plan(strip_wrappers(model), self._names, self._shadow, self.include_buffers)
            self._plan_model = weakref.ref(model)
        return self._plan

    # -- reading the average -----------------------------------------------------------------
    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The EMA tensors by parameter name (rank-local shards under FSDP2); live, not copies."""
        self._flush()
        return dict(zip(self._names, self._shadow, strict=True))

    @property
    def nbytes(self) -> int:
        """Memory held by the EMA on this rank."""
        return sum(t.numel() * t.element_size() for t in self._shadow)

    @torch.no_grad()
    def figures(self, model: nn.Module) -> dict[str, float]:
        """What the trackers show of the EMA (``forge/ema/...``): the decay of the newest
        update, the averaging updates so far, and how far the average is from the live
        weights (``||ema - w|| / ||w||`` over everything tracked; one pass, on logging steps).

        Example:
            >>> model = torch.nn.Linear(2, 2); ema = EMAWeights(model); ema.update(model)
            >>> sorted(ema.figures(model))
            ['forge/ema/decay', 'forge/ema/relative_distance', 'forge/ema/updates']
        """
        self._flush()
        live = self._plan_for(model).locals()
        shadow = [s.to(device=w.device, dtype=w.dtype) if s.device != w.device or s.dtype != w.dtype else s
                  for s, w in zip(self._shadow, live, strict=True)]
        diff = torch._foreach_sub(shadow, live)
        squares = torch.stack([torch.stack([n.float() for n in torch._foreach_norm(diff)]).square().sum(),
                               torch.stack([n.float() for n in torch._foreach_norm(live)]).square().sum()])
        if self._plan_for(model).sharded:  # each rank holds a part of every weight: sum the parts
            all_reduce_(squares)
        num, den = squares.sqrt().tolist()
        distance = num / den if den > 0 else 0.0
        return {"forge/ema/decay": self.get_decay(self.step) if self.step else 0.0,
                "forge/ema/updates": float(self.num_updates),
                "forge/ema/relative_distance": distance}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's tracked weights with the EMA (cast to their dtype).

        Example:
            >>> model = torch.nn.Linear(2, 2); ema = EMAWeights(model); ema.copy_to(model)
        """
        self._flush()
        copy_pairs_(self._plan_for(model).locals(), self._shadow)

    @contextmanager
    def apply_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Swap the EMA weights into ``model`` for the ``with`` block, then restore the raw
        weights exactly (they are kept in a backup on the EMA's device).

        Example:
            >>> model = torch.nn.Linear(2, 2); ema = EMAWeights(model)
            >>> with ema.apply_to(model):
            ...     _ = model(torch.ones(1, 2))
        """
        self._flush()
        targets = self._plan_for(model).locals()
        with torch.no_grad():
            backup = [t.detach().to(s.device, copy=True) for t, s in zip(targets, self._shadow, strict=True)]
            copy_pairs_(targets, self._shadow)
        try:
            yield model
        finally:
            with torch.no_grad():
                copy_pairs_(targets, backup)

    # -- state -------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The constructor settings that define what the average means (JSON-serialisable)."""
        return {
            "decay": self.decay, "update_every": self.update_every, "update_after_step": self.update_after_step,
            "warmup": self.warmup, "inv_gamma": self.inv_gamma, "power": self.power, "min_decay": self.min_decay,
            "include_frozen": self.include_frozen, "include_buffers": self.include_buffers,
            "dtype": str(self.dtype).removeprefix("torch.") if self.dtype is not None else "auto",
        }  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """``{"shadow": {name: tensor}, "step", "num_updates", "settings"}``; tensors are the
        live EMA tensors (local shards under FSDP2, see :meth:`full_state_dict`).

        Example:
            >>> ema = EMAWeights(torch.nn.Linear(2, 2)); sorted(ema.state_dict())
            ['num_updates', 'settings', 'shadow', 'step']
        """
        return {"shadow": self.shadow, "step": self.step, "num_updates": self.num_updates, "settings": self.settings()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` or a saved file's contents. Full tensors are cut to
        this rank's shard under FSDP2. Differing settings are kept as constructed, with a warning.

        Raises:
            KeyError: when tensor names differ from the ones this EMA tracks.

        Example:
            >>> a = EMAWeights(torch.nn.Linear(2, 2)); b = EMAWeights(torch.nn.Linear(2, 2))
            >>> b.load_state_dict(a.state_dict())
        """
        shadow = state["shadow"]
        missing = [n for n in self._names if n not in shadow]
        unexpected = [n for n in shadow if n not in set(self._names)]
        if missing or unexpected:
            raise KeyError(f"EMA state does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self._pending = None
        for name, dst, spec in zip(self._names, self._shadow, self._specs, strict=True):
            src = shadow[name]
            if spec is not None and src.shape == spec.shape and src.shape != dst.shape:
                src = shard_full(src, spec)
            dst.copy_(src)
        self.step = int(state.get("step", 0))
        self.num_updates = int(state.get("num_updates", 0))
        theirs = state.get("settings") or {}
        differ = {k: (v, self.settings()[k]) for k, v in theirs.items() if self.settings().get(k, v) != v}
        if differ:
            logger.warning("EMA state was saved with other settings (saved, now): %s; using the new ones.", differ)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) EMA tensors on CPU by name. A collective under FSDP2: call it on every rank.
        Tensors already on CPU are returned as they are (they share memory with the EMA).

        Example:
            >>> EMAWeights(torch.nn.Linear(2, 2)).full_state_dict()["weight"].shape
            torch.Size([2, 2])
        """
        self._flush()
        out = {}
        for name, t, spec in zip(self._names, self._shadow, self._specs, strict=True):
            full = gather_full(t, spec) if spec is not None else t
            out[name] = full.detach().to("cpu").contiguous()
        return out

    def save(self, path: str | os.PathLike, *, write: bool | None = None) -> str:
        """Write the full EMA and its counters/settings to a safetensors file.

        Call on every rank under FSDP2 (gathering is collective); only ``write`` ranks write,
        by default rank 0. It does not wait for the writer: put a barrier between a save and
        a load on other ranks.

        Example:
            >>> import tempfile; ema = EMAWeights(torch.nn.Linear(2, 2))
            >>> path = ema.save(os.path.join(tempfile.mkdtemp(), "ema.safetensors"))
        """
        from safetensors.torch import save_file

        path = os.fspath(path)
        tensors = self.full_state_dict()
        if is_main_process() if write is None else write:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            meta = {"step": self.step, "num_updates": self.num_updates, "settings": self.settings()}
            save_file(tensors, path + ".tmp", metadata={"format": "pt", "forge_ema": json.dumps(meta)})
            os.replace(path + ".tmp", path)  # a crash mid-write never leaves a half file behind
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Load a file written by :meth:`save` (on every rank).

        Example:
            >>> import tempfile; ema = EMAWeights(torch.nn.Linear(2, 2))
            >>> ema.load(ema.save(os.path.join(tempfile.mkdtemp(), "ema.safetensors")))
        """
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("forge_ema", "{}"))
            shadow = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        self.load_state_dict({**meta, "shadow": shadow})

    def __repr__(self) -> str:
        return (
            f"EMAWeights(tensors={len(self._names)}, MiB={self.nbytes / 2**20:.1f}, step={self.step}, "
            f"decay={self.decay}, update_every={self.update_every}, warmup={self.warmup!r})"
        )
