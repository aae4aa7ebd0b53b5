"""Choose how many blocks to freeze from a memory budget and a short gradient probe.

One real training step on a real batch (every schedulable parameter trainable), measured by
forge's one memory model (:class:`forge.core.memory.StepMemory`, the same that autotune
uses: the run's optimizer with its state allocated by a warm-up step, the allocator's peak on
CUDA, the live-tensor high-water mark elsewhere), gives:

* the high-water mark of forward+backward and of the optimizer step, the optimizer state of
  every parameter, and the activation bytes autograd saved per block,
* each block's gradient-to-weight norm ratio (how hard the loss pulls on it, relative to its size).

The plan that freezes nothing *is* that measurement. For a plan that freezes the embeddings
and the blocks below block ``k``, the estimated peak is::

    weights + batch + optimizer state(trainable) + max(forward/backward - activations saved below k,
                                                        grads(trainable) + optimizer step transient)

Example::

    from forge.layers.suggest import suggest_freeze
    s = suggest_freeze(model, batch, budget_bytes=20 * 2**30)
    print(s)          # the table and the reason
    s.apply(model)    # freeze what it chose
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from forge.core.discovery import LayerInfo, find_layers
from forge.core.memory import FORWARD_BACKWARD, OptimizerFactory
from forge.layers.freeze import (
    FreezeReport,
    freeze_layers,
    set_trainable_,
    trainable_universe,
)
from forge.layers.memory import ProbeResult, group_order, probe_step

__all__ = ["FreezePlan", "FreezeSuggestion", "suggest_freeze"]


@dataclass(frozen=True)
class FreezePlan:
    """One candidate: freeze ``frozen_blocks`` (and the embeddings when any block is frozen).

    Example::

        plan = suggest_freeze(model, batch).plans[2]
        plan.frozen_blocks, plan.peak_bytes / 2**30
    """

    n_freeze: int
    frozen_blocks: tuple[int, ...]
    trainable_params: int
    grads_bytes: int
    optimizer_bytes: int
    forward_backward_bytes: int  # forward+backward high-water mark without weights/optimizer state
    peak_bytes: int  # weights + batch + optimizer state + max(forward/backward, grads + step)
    signal_frozen: float  # share of the summed gradient-to-weight ratios that is frozen


@dataclass
class FreezeSuggestion:
    """Result of :func:`suggest_freeze`: the chosen plan, every candidate and the probe ratios.

    Example::

        s = suggest_freeze(model, batch, budget_bytes=8 * 2**30)
        s.n_freeze, s.plan.peak_bytes, s.ratios
        s.apply(model)
    """

    n_freeze: int
    plans: list[FreezePlan]
    ratios: dict[int, float]  # block index -> gradient-to-weight norm ratio
    weights_bytes: int
    budget_bytes: int | None
    reason: str
    freeze_embeddings: bool = True
    info: LayerInfo | None = field(default=None, repr=False)

    @property
    def plan(self) -> FreezePlan:
        """The chosen plan."""
        return self.plans[self.n_freeze]

    def apply(self, model: nn.Module, verbose: bool = False) -> FreezeReport:
        """Freeze the chosen blocks (and embeddings) on ``model`` in place.

        Example::

            suggest_freeze(model, batch, budget_bytes=2**30).apply(model, verbose=True)
        """
        frozen = list(self.plan.frozen_blocks)
        embeddings = True if frozen and self.freeze_embeddings else None
        return freeze_layers(model, indices=frozen, embeddings=embeddings, verbose=verbose, info=self.info)

    def __str__(self) -> str:
        mib = 2**20
        lines = [
            (
                f"{'freeze':>6}  {'trainable':>11}  {'grads MiB':>9}  {'optim MiB':>9}  {'fwd/bwd MiB':>11}  "
                f"{'peak MiB':>9}  {'fits':>4}  {'signal frozen':>13}"
            )
        ]
        for plan in self.plans:
            fits = "-" if self.budget_bytes is None else ("yes" if plan.peak_bytes <= self.budget_bytes else "no")
            mark = "  <- chosen" if plan.n_freeze == self.n_freeze else ""
            lines.append(
                f"{plan.n_freeze:>6}  {plan.trainable_params:>11,}  {plan.grads_bytes / mib:>9.1f}  "
                f"{plan.optimizer_bytes / mib:>9.1f}  {plan.forward_backward_bytes / mib:>11.1f}  "
                f"{plan.peak_bytes / mib:>9.1f}  {fits:>4}  {100 * plan.signal_frozen:>12.1f}%{mark}"
            )
        ratios = ", ".join(f"{i}:{r:.2e}" for i, r in sorted(self.ratios.items()))
        lines.append(f"weights {self.weights_bytes / mib:.1f} MiB; grad/weight ratio by block: {ratios}")
        lines.append(self.reason)
        return "\n".join(lines)


def _default_batch(model: nn.Module, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise ValueError("suggest_freeze: pass a batch (the model has no config.vocab_size)")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _module_groups(model: nn.Module, info: LayerInfo) -> dict[str, list[nn.Module]]:
    get = model.get_submodule
    groups: dict[str, list[nn.Module]] = {f"block.{i}": [get(p)] for i, p in enumerate(info.blocks)}
    for key in ("vision", "embeddings", "norm", "head"):
        groups[key] = [get(p) for p in getattr(info, key)]
    return groups


def _run_probe(
    model: nn.Module, batch: Mapping[str, torch.Tensor], info: LayerInfo, universe: list[str],
    optimizer_factory: OptimizerFactory,
) -> ProbeResult:
    named = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in named.items()}
    grads = {n: p.grad for n, p in named.items()}
    was_training = model.training
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        set_trainable_(named.values(), False)
        set_trainable_((named[n] for n in universe), True)
        model.train()
        return probe_step(model, batch, info.groups, _module_groups(model, info), info.num_blocks,
                          optimizer_factory)
    finally:
        # Leave the model exactly as found: flags, grads, mode and the RNG streams dropout used.
        for n, p in named.items():
            p.requires_grad_(flags[n])
            p.grad = grads[n]
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _plans(
    info: LayerInfo,
    named: dict[str, nn.Parameter],
    universe: list[str],
    probe: ProbeResult,
    order: list[int],
    ratios: dict[int, float],
) -> list[FreezePlan]:
    n = info.num_blocks
    position = group_order(n)
    group_of = info.group_of()
    total_signal = sum(ratios.values()) or 1.0
    fixed = probe.step.persistent_bytes - probe.step.optimizer_bytes  # weights and the batch
    plans = []
    for k in range(n + 1):
        frozen_blocks = sorted(order[:k])
        frozen_groups = {f"block.{i}" for i in frozen_blocks} | ({"embeddings"} if k else set())
        names = [x for x in universe if group_of[x] not in frozen_groups]
        trainable = [named[x] for x in names]
        grads = sum(p.numel() * p.element_size() for p in trainable)
        state = sum(probe.state_bytes.get(x, 0) for x in names)
        # Autograd saves nothing below the lowest trainable group: those activations disappear.
        lowest = min((position[group_of[x]] for x in names), default=n + 1)
        dropped = sum(b for g, b in probe.saved.items() if position[g] < lowest)
        activations = max(probe.step.phases[FORWARD_BACKWARD] - dropped, grads)
        # The step's temporaries as measured with everything trainable: an upper bound for fewer.
        step = grads + probe.step_transient
        plans.append(
            FreezePlan(
                n_freeze=k,
                frozen_blocks=tuple(frozen_blocks),
                trainable_params=sum(p.numel() for p in trainable),
                grads_bytes=grads,
                optimizer_bytes=state,
                forward_backward_bytes=activations,
                peak_bytes=fixed + state + max(activations, step),
                signal_frozen=sum(ratios.get(i, 0.0) for i in frozen_blocks) / total_signal,
            )
        )
    return plans


def suggest_freeze(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor] | None = None,
    *,
    budget_bytes: int | None = None,
    max_signal_loss: float | None = None,
    order: Literal["bottom", "gradient"] = "bottom",
    batch_size: int = 1,
    seq_len: int = 128,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    optimizer_kwargs: dict[str, Any] | None = None,
) -> FreezeSuggestion:
    """Pick how many blocks to freeze and explain why in one table.

    The candidates freeze ``k = 0 .. n`` blocks (plus the embeddings once ``k >= 1``), bottom-up
    (``order="bottom"``, which also drops their activations) or lowest gradient-to-weight ratio
    first (``order="gradient"``). The choice is the smallest ``k`` whose estimated peak fits
    ``budget_bytes``, raised to the largest ``k`` whose frozen share of the summed ratios stays
    within ``max_signal_loss``. The model is left untouched (flags, grads, RNG, train mode).

    Args:
        model: plain or PEFT-wrapped HF model on the device it will train on.
        batch: one training batch with labels, at the real batch size and sequence length;
            default: random tokens of ``batch_size`` x ``seq_len`` as a causal-LM batch.
        budget_bytes: memory budget for training (weights included).
        max_signal_loss: largest share of the summed gradient-to-weight ratios you accept to freeze.
        order: ``"bottom"`` or ``"gradient"``.
        batch_size: rows of the default batch.
        seq_len: length of the default batch.
        optimizer_cls: optimizer whose state is measured (the Trainer default is AdamW).
        optimizer_kwargs: its arguments (e.g. ``{"fused": True}``).

    Returns:
        A :class:`FreezeSuggestion`; ``str()`` gives the table, ``.apply(model)`` freezes.

    Raises:
        ValueError: bad ``order``/``max_signal_loss`` or a batch without a loss.

    Example::

        s = suggest_freeze(model, batch_size=8, seq_len=512, budget_bytes=24 * 2**30)
        print(s)
        s.apply(model)
    """
    if order not in ("bottom", "gradient"):
        raise ValueError(f"order must be 'bottom' or 'gradient', got {order!r}")
    if max_signal_loss is not None and not 0.0 <= max_signal_loss <= 1.0:
        raise ValueError(f"max_signal_loss must be in [0, 1], got {max_signal_loss}")
    info = find_layers(model)
    universe = trainable_universe(model)
    batch = dict(batch) if batch is not None else _default_batch(model, batch_size, seq_len)
    kwargs = {**(optimizer_kwargs or {}), "lr": 0.0}  # lr=0: the probe's step moves no weight

    def factory(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return optimizer_cls(params, **kwargs)

    probe = _run_probe(model, batch, info, universe, factory)
    named = dict(model.named_parameters())
    ratios = {
        i: probe.grad_norm.get(f"block.{i}", 0.0) / max(probe.weight_norm.get(f"block.{i}", 0.0), 1e-12)
        for i in range(info.num_blocks)
    }
    block_order = list(range(info.num_blocks)) if order == "bottom" else sorted(ratios, key=ratios.get)
    plans = _plans(info, named, universe, probe, block_order, ratios)
    weights = probe.step.weights_bytes

    k_budget, reason = 0, "no budget given"
    if budget_bytes is not None:
        fitting = [p.n_freeze for p in plans if p.peak_bytes <= budget_bytes]
        if fitting:
            k_budget = fitting[0]
            reason = f"freezing {k_budget} is the least that fits {budget_bytes / 2**20:.1f} MiB"
        else:
            k_budget = info.num_blocks
            reason = f"nothing fits {budget_bytes / 2**20:.1f} MiB; freezing every block is the closest"
    k = k_budget
    if max_signal_loss is not None:
        k_signal = max(p.n_freeze for p in plans if p.signal_frozen <= max_signal_loss + 1e-12)
        if k_signal > k:
            k = k_signal
            share = 100 * plans[k].signal_frozen
            reason = f"freezing {k} gives up {share:.1f}% of the gradient signal, within {max_signal_loss:.0%}"
    return FreezeSuggestion(
        n_freeze=k,
        plans=plans,
        ratios=ratios,
        weights_bytes=weights,
        budget_bytes=budget_bytes,
        reason=f"chosen: freeze {k} of {info.num_blocks} blocks ({order} first); {reason}",
        info=info,
    )
