"""Layer-wise learning-rate decay (LLRD): lower blocks learn more slowly than upper ones.

Depths follow ELECTRA/BEiT: embeddings are depth 0, block ``i`` is depth ``i + 1`` and the final
norm / head / other top parts are depth ``n + 1``; a parameter at depth ``d`` gets
``base_lr * decay ** (n + 1 - d)``. So the head trains at ``base_lr``, the top block at
``base_lr * decay`` and the embeddings at ``base_lr * decay ** (n + 1)``. Weight decay is split
exactly like the Trainer does (none on biases and norms).

Example::

    from forge.layers.llrd import layerwise_lr_groups, layerwise_lr_optimizer
    opt = torch.optim.AdamW(layerwise_lr_groups(model, base_lr=1e-4, decay=0.8, weight_decay=0.01))
    # or inside the Trainer (reads lr, weight decay and `optim` from the TrainingArguments):
    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=layerwise_lr_optimizer(args, 0.8))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from forge.core.discovery import LayerInfo, find_layers

__all__ = ["LayerwiseLRDecayFactory", "layer_depths", "layerwise_lr_groups", "layerwise_lr_optimizer"]


def layer_depths(model: nn.Module, info: LayerInfo | None = None) -> dict[str, int]:
    """Depth of every parameter (0 = embeddings and a vision tower, ``i + 1`` = block ``i``,
    ``n + 1`` = head/norm/other).

    Example::

        layer_depths(model)["model.layers.0.mlp.up_proj.weight"]  # 1
    """
    info = info or find_layers(model)
    top = info.num_blocks + 1
    depths = {}
    for key, names in info.groups.items():
        # A vision tower feeds the language model's input side: it learns as slowly as the embeddings.
        depth = 0 if key in ("embeddings", "vision") else int(key.split(".")[1]) + 1 if key.startswith("block.") else top
        depths.update(dict.fromkeys(names, depth))
    return depths


def _decay_names(model: nn.Module) -> set[str]:
    from transformers import Trainer

    # The method never touches `self`; calling it keeps our split identical to the Trainer's.
    return set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]


def layerwise_lr_groups(
    model: nn.Module,
    base_lr: float,
    decay: float = 0.9,
    weight_decay: float = 0.0,
    *,
    info: LayerInfo | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise decayed learning rates.

    Only parameters with ``requires_grad`` are included (as the Trainer does). Groups are
    ordered top-down so ``param_groups[0]`` (the rate the Trainer logs) carries ``base_lr``.
    Each group has a ``"name"`` key such as ``"block.3"`` or ``"block.3/no_decay"``.

    Args:
        model: plain or PEFT-wrapped HF model.
        base_lr: learning rate of the head (depth ``n + 1``).
        decay: multiplicative factor per depth step, in (0, 1].
        weight_decay: applied to all but biases and norm weights.
        info: a precomputed :func:`forge.layers.find_layers` result.

    Returns:
        A list of dicts accepted by any ``torch.optim.Optimizer``.

    Raises:
        ValueError: ``decay`` outside (0, 1] or nothing trainable.

    Example::

        groups = layerwise_lr_groups(model, base_lr=2e-5, decay=0.9, weight_decay=0.01)
        optimizer = torch.optim.AdamW(groups)
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer-wise lr decay must be in (0, 1], got {decay}")
    info = info or find_layers(model)
    depths = layer_depths(model, info)
    top = info.num_blocks + 1
    decays = _decay_names(model)
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault((depths[name], name in decays), []).append(p)
    if not buckets:
        raise ValueError("layerwise_lr_groups: the model has no trainable parameters")
    label = {0: "embeddings", top: "head"}
    groups = []
    for (depth, with_decay), params in sorted(buckets.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        name = label.get(depth, f"block.{depth - 1}") + ("" if with_decay else "/no_decay")
        groups.append(
            {
                "params": params,
                "lr": base_lr * decay ** (top - depth),
                "weight_decay": weight_decay if with_decay else 0.0,
                "name": name,
            }
        )
    return groups


class LayerwiseLRDecayFactory:
    """Optimizer factory for ``Trainer(optimizer_cls_and_kwargs=(LayerwiseLRDecayFactory, kwargs))``.

    transformers 5 treats a first element that is not an ``Optimizer`` subclass as a factory:
    it calls ``LayerwiseLRDecayFactory()(model, **kwargs)`` when it builds the optimizer, so the
    groups see the final model (PEFT wrapping, schedule callbacks) and nothing is mutated
    between ``train()`` calls. Build ``kwargs`` with :func:`layerwise_lr_optimizer`.

    Example::

        cls, kwargs = layerwise_lr_optimizer(args, decay=0.8)
        optimizer = cls()(model, **kwargs)
    """

    def __call__(
        self,
        model: nn.Module,
        *,
        base_lr: float,
        decay: float,
        weight_decay: float,
        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
        optimizer_kwargs: dict[str, Any] | None = None,
    ) -> torch.optim.Optimizer:
        groups = layerwise_lr_groups(model, base_lr, decay, weight_decay)
        return optimizer_cls(groups, **{**(optimizer_kwargs or {}), "lr": base_lr})


def layerwise_lr_optimizer(
    training_args: Any, decay: float = 0.9
) -> tuple[type[LayerwiseLRDecayFactory], dict[str, Any]]:
    """``optimizer_cls_and_kwargs`` for the Trainer: LLRD on top of ``args.optim``.

    The optimizer class and its betas/eps/fused flags come from
    ``Trainer.get_optimizer_cls_and_kwargs(training_args)``, the rates and weight decay from
    ``learning_rate`` / ``weight_decay``; the LR scheduler then scales every group alike.

    Args:
        training_args: the ``TrainingArguments`` of the run.
        decay: per-depth factor, in (0, 1].

    Returns:
        ``(LayerwiseLRDecayFactory, kwargs)``.

    Raises:
        ValueError: an ``optim`` that builds its own parameter groups (GaLore, LOMO, ...).

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          optimizer_cls_and_kwargs=layerwise_lr_optimizer(args, decay=0.85))
    """
    from transformers import Trainer

    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer-wise lr decay must be in (0, 1], got {decay}")
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args)
    clash = {"params", "model", "optimizer_dict"} & optimizer_kwargs.keys()
    if clash or not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise ValueError(f"optim={training_args.optim!r} builds its own parameter groups; LLRD cannot wrap it")
    kwargs = {
        "base_lr": float(training_args.learning_rate),
        "decay": float(decay),
        "weight_decay": float(training_args.weight_decay),
        "optimizer_cls": optimizer_cls,
        "optimizer_kwargs": {k: v for k, v in optimizer_kwargs.items() if k != "lr"},
    }
    return LayerwiseLRDecayFactory, kwargs
