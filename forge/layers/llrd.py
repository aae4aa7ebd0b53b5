"""Layer-wise learning-rate decay (LLRD): lower blocks learn more slowly than upper ones.

A parameter ``d`` steps below the top gets ``base_lr * decay ** d`` (ELECTRA/BEiT's rule, counted
from the output): the head, the final norm and task modules (pooler, classifier) are the top,
``d = 0``, so they train at ``base_lr``; the ``k``-th block from the top of its stack has
``d = k`` (the top block ``base_lr * decay``); the embeddings sit one below the bottom block,
``d = n + 1``. Two cases users trip on:

* A tied LM head is one tensor with the input embeddings. It is the output projection, so it
  trains with the head at ``base_lr``, tied or not (at the embeddings' rate a 28-block model's
  output layer would learn at ``0.9 ** 29 ~ 5%`` of the base rate).
* Encoder-decoder models (T5, BART) have two stacks side by side, not one on top of the other:
  each is decayed from its own top, so the top encoder block and the top decoder block both get
  ``base_lr * decay``. Embeddings inside one stack (BART's positions, and the norm applied right
  after them) sit below that stack; shared ones below the deeper stack.

Weight decay is split exactly like the Trainer does (none on biases and norms).

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
from forge.core.unwrap import unwrap

__all__ = ["LayerwiseLRDecayFactory", "layer_depths", "layerwise_lr_groups", "layerwise_lr_optimizer"]


def layer_depths(model: nn.Module, info: LayerInfo | None = None) -> dict[str, int]:
    """Decay steps below the top for every parameter: the exponent ``d`` of ``base_lr * decay ** d``.

    0 for the head (tied or not), final norms and task modules; ``k`` for the ``k``-th block from
    the top of its stack; one more than its stack's block count for the embeddings (the deeper
    stack's, for embeddings shared by an encoder and a decoder); a vision tower with the
    deepest embeddings (it feeds the language model's input side).

    Example::

        layer_depths(model)["model.layers.0.mlp.up_proj.weight"]  # n_blocks for the bottom block
    """
    info = info or find_layers(model)
    per_stack = [info.block_stack.count(s) for s in range(len(info.stacks))]
    first = [info.block_stack.index(s) for s in range(len(info.stacks))]
    bottom = max(per_stack) + 1
    # An embedding under one stack's container (BART's `model.encoder.embed_positions`) sits below it.
    containers = [path.rpartition(".")[0] for path in info.stacks]
    depths = {}
    for name, key in _groups(model, info).items():
        if key in ("head", "norm", "other"):
            depths[name] = 0
        elif key == "vision":
            # A vision tower feeds the language model's input side: it learns as slowly as the embeddings.
            depths[name] = bottom
        elif key.startswith("block."):
            i = int(key.split(".")[1])
            s = info.block_stack[i]
            depths[name] = per_stack[s] - (i - first[s])
        else:
            owners = [s for s, c in enumerate(containers) if c and name.startswith(c + ".")]
            depths[name] = per_stack[owners[0]] + 1 if len(owners) == 1 else bottom
    return depths


def _groups(model: nn.Module, info: LayerInfo) -> dict[str, str]:
    """:func:`find_layers`' group of each parameter, as LLRD reads it: a tied head weight is the
    head's, and a norm applied right after the embeddings (BART's ``layernorm_embedding``) theirs."""
    groups = info.group_of()
    for name, key in groups.items():
        if key == "norm" and "embed" in name.rpartition(".")[0]:
            groups[name] = "embeddings"
    for name in _head_parameter_names(model):
        groups[name] = "head"
    return groups


def _head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the output head's parameters, as ``named_parameters`` lists them (a tied weight
    appears once, under the embeddings' name)."""
    get = getattr(unwrap(model), "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    ids = {id(p) for p in head.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


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
    Each group has a ``"name"`` key: a :func:`~forge.layers.find_layers` group (``"head"``,
    ``"norm"``, ``"other"``, ``"block.3"``, ``"embeddings"``), with ``"/no_decay"`` for biases and
    norms. See the module docstring for the depth rule.

    Args:
        model: plain or PEFT-wrapped HF model.
        base_lr: learning rate of the top: head, final norm, task modules.
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
    group_of = _groups(model, info)
    blocks = [key for key in info.groups if key.startswith("block.")]
    order = {key: i for i, key in enumerate(["head", "norm", "other", *reversed(blocks), "embeddings"])}
    decays = _decay_names(model)
    buckets: dict[tuple[int, int, bool], tuple[str, list[nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = group_of[name]
            bucket = buckets.setdefault((depths[name], order[key], name not in decays), (key, []))
            bucket[1].append(p)
    if not buckets:
        raise ValueError("layerwise_lr_groups: the model has no trainable parameters")
    groups = []
    for (depth, _, no_decay), (key, params) in sorted(buckets.items()):
        groups.append(
            {
                "params": params,
                "lr": base_lr * decay**depth,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "name": key + ("/no_decay" if no_decay else ""),
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
