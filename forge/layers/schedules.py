"""Trainability schedules as ``TrainerCallback``s: gradual unfreezing, LP-LoRA and LISA.

Create the callback before ``trainer.train()`` (it marks every parameter it will ever train as
trainable so the Trainer's optimizer holds them, then applies the schedule at the first step).
Frozen parameters get ``grad=None``, which torch optimizers skip entirely: no update and no
weight decay. Trainability is a pure function of the step (and seed), so a resumed run matches
an uninterrupted one; each checkpoint also gets a ``forge_<kind>.json`` with the schedule state.

Example::

    from forge.layers.schedules import GradualUnfreezingCallback
    cb = GradualUnfreezingCallback(model, every_n_steps=100)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import nn

from forge.core.discovery import LayerInfo, is_peft_original_copy, peft_prefix
from forge.layers.freeze import trainable_universe
from forge.layers.schedule import TrainabilitySchedule

__all__ = ["GradualUnfreezingCallback", "LISACallback", "LPLoRACallback"]


class GradualUnfreezingCallback(TrainabilitySchedule):
    """ULMFiT-style gradual unfreezing: head first, then one group of blocks at a time, top-down.

    Stage 0 trains the head, final norm and other top parts; every ``every_n_steps`` steps (or
    ``every_n_epochs`` epochs) the next ``blocks_per_stage`` blocks below join; the embeddings
    join after the last block, and a vision-language model's vision tower (when it trains at
    all) after them. Only parameters that were trainable when the callback was created (plus none
    other) are ever switched on, so static freezing and PEFT adapters are respected: on a LoRA
    model the adapters unfreeze top-down.

    Args:
        model: the model (or None to bind to the Trainer's model in ``on_init_end``).
        every_n_steps: optimizer steps per stage.
        every_n_epochs: epochs per stage (instead of steps).
        blocks_per_stage: blocks unfrozen at each stage.
        unfreeze_embeddings: let the embeddings join after the last block (else they stay frozen).
        reset_optimizer_state: drop optimizer state of parameters when they are frozen (never
            happens in this schedule; kept for symmetry).

    Example::

        cb = GradualUnfreezingCallback(model, every_n_epochs=1, blocks_per_stage=2)
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    """

    kind = "gradual_unfreezing"

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        blocks_per_stage: int = 1,
        unfreeze_embeddings: bool = True,
        reset_optimizer_state: bool = False,
    ) -> None:
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        self.blocks_per_stage = blocks_per_stage
        self.unfreeze_embeddings = unfreeze_embeddings
        super().__init__(model, every_n_steps, every_n_epochs, reset_optimizer_state)

    def config(self) -> dict[str, Any]:
        extra = {"blocks_per_stage": self.blocks_per_stage, "unfreeze_embeddings": self.unfreeze_embeddings}
        return {**super().config(), **extra}

    def _prepare(self) -> None:
        info, managed = self._info, set(self._managed)

        def pick(keys: list[str]) -> set[str]:
            return {n for k in keys for n in info.groups[k] if n in managed}

        n, g = info.num_blocks, self.blocks_per_stage
        stages = [pick(["head", "norm", "other"])]
        for s in range(1, math.ceil(n / g) + 1):
            stages.append(stages[0] | pick([f"block.{i}" for i in range(max(n - s * g, 0), n)]))
        if self.unfreeze_embeddings:
            stages.append(stages[-1] | pick(["embeddings"]))
        # A multimodal model's vision tower is the input side of it all: it joins last.
        stages.append(stages[-1] | pick(["vision"]))
        # Skip stages that add nothing (no trainable head on a LoRA model, frozen embeddings).
        self._stages = [s for i, s in enumerate(stages) if s and (i == 0 or s != stages[i - 1])]

    @property
    def num_stages(self) -> int:
        """Stages until everything scheduled is trainable."""
        return len(self._stages)

    def _active(self, period: int) -> set[str]:
        return self._stages[min(period, len(self._stages) - 1)]


class LPLoRACallback(TrainabilitySchedule):
    """Two-stage "linear probe, then LoRA" (LP-LoRA; LP-FT on a model without adapters).

    Stage 1 (the first ``probe_steps`` steps / ``probe_epochs`` epochs) trains only the head,
    which aligns it with the frozen features before the adapters start moving them. Stage 2
    trains the adapters (on a plain model: everything trainable when the callback was created)
    and, unless ``train_head_after_probe=False``, the head.

    On a PEFT model the head must be in ``modules_to_save`` (e.g. ``task_type="SEQ_CLS"`` does
    this for ``score``/``classifier``), otherwise PEFT checkpoints would not save it.

    Args:
        model: the model (or None to bind in ``on_init_end``).
        probe_steps: optimizer steps of the linear-probe stage.
        probe_epochs: epochs of the linear-probe stage (instead of steps).
        train_head_after_probe: keep the head trainable in stage 2.
        reset_optimizer_state: drop the head's optimizer state if it is frozen in stage 2.

    Raises:
        ValueError: no separate head (tied to the embeddings) or a PEFT head outside modules_to_save.

    Example::

        peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"]))
        cb = LPLoRACallback(peft_model, probe_steps=200)
    """

    kind = "lp_lora"

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        probe_steps: int | None = None,
        probe_epochs: int | None = None,
        train_head_after_probe: bool = True,
        reset_optimizer_state: bool = True,
    ) -> None:
        self.train_head_after_probe = train_head_after_probe
        super().__init__(model, probe_steps, probe_epochs, reset_optimizer_state)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "train_head_after_probe": self.train_head_after_probe}

    def _managed_extra(self, model: nn.Module, info: LayerInfo) -> list[str]:
        if info.tied_head:
            raise ValueError("LP-LoRA: the head is tied to the input embeddings; a probe needs its own head")
        head = [n for n in info.groups["head"] if not is_peft_original_copy(n)]
        if peft_prefix(model) is not None:
            head = [n for n in head if n in set(trainable_universe(model))]
            if not head:
                raise ValueError(
                    "LP-LoRA: the PEFT model does not train its head; add it to "
                    "LoraConfig(modules_to_save=[...]) so checkpoints keep it"
                )
        if not head:
            raise ValueError("LP-LoRA: the model has no head parameters to probe")
        self._head = head
        return head

    def _prepare(self) -> None:
        head = set(self._head)
        rest = {n for n in self._managed if n not in head}
        if not rest:
            raise ValueError("LP-LoRA: nothing besides the head is trainable for stage 2")
        self._stages = [head, rest | head if self.train_head_after_probe else rest]

    def _active(self, period: int) -> set[str]:
        return self._stages[min(period, 1)]


class LISACallback(TrainabilitySchedule):
    """LISA layer sampling: ``active_layers`` random blocks train, re-drawn every period.

    Parameters outside the blocks that were trainable at creation (embeddings, head, norms, a
    vision tower) train throughout, as in the LISA paper; the blocks drawn are the language
    model's. The draw for period ``k`` comes from
    ``numpy.random.default_rng([seed, k])``: deterministic under a seed, independent of the
    global RNGs (so dropout and data order are untouched), and identical after a resume.
    By default a block's optimizer state is dropped when it is deactivated, which is where
    LISA's memory saving comes from and avoids stale Adam moments when the block returns.

    Args:
        model: the model (or None to bind in ``on_init_end``).
        active_layers: blocks trainable at a time.
        every_n_steps: steps between re-draws.
        every_n_epochs: epochs between re-draws (instead of steps).
        seed: seed of the draws.
        reset_optimizer_state: drop a block's optimizer state when it is deactivated.

    Example::

        cb = LISACallback(model, active_layers=2, every_n_steps=20, seed=0)
    """

    kind = "lisa"

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        active_layers: int = 2,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        seed: int = 0,
        reset_optimizer_state: bool = True,
    ) -> None:
        if active_layers < 1:
            raise ValueError(f"active_layers must be >= 1, got {active_layers}")
        self.active_layers = active_layers
        self.seed = seed
        super().__init__(model, every_n_steps, every_n_epochs, reset_optimizer_state)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "active_layers": self.active_layers, "seed": self.seed}

    def _prepare(self) -> None:
        managed = set(self._managed)
        self._always = {n for n in managed if n not in self._names_to_block}
        by_block: dict[int, set[str]] = {}
        for n in managed & self._names_to_block.keys():
            by_block.setdefault(self._names_to_block[n], set()).add(n)
        if self.active_layers > len(by_block):
            raise ValueError(f"LISA: active_layers={self.active_layers} but only {len(by_block)} blocks can train")
        self._eligible = sorted(by_block)
        self._by_block = by_block

    def draw(self, period: int) -> list[int]:
        """Block indices active during ``period`` (same answer for the same seed, every time)."""
        rng = np.random.default_rng([self.seed, period])
        return sorted(int(i) for i in rng.choice(self._eligible, size=self.active_layers, replace=False))

    def _active(self, period: int) -> set[str]:
        return self._always.union(*(self._by_block[i] for i in self.draw(period)))
