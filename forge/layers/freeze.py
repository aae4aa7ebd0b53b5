"""Freezing for any HF model, plain or PEFT-wrapped, on the blocks :func:`forge.core.discovery.find_layers` finds.

``freeze_layers`` freezes by ratio, counts, indices (middle and negative too) or regex and
prints a per-block table; ``unfreeze_all`` undoes it (on a PEFT model: the adapters only).

Example::

    from forge.layers import freeze_layers
    report = freeze_layers(model, ratio=0.5, embeddings=True)  # bottom half + embeddings
    print(report)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from forge.core.discovery import (
    LayerInfo,
    compile_pattern,
    find_layers,
    is_adapter_param,
    is_peft_original_copy,
    peft_prefix,
)
from forge.core.unwrap import unwrap

__all__ = [
    "FreezeReport",
    "freeze_layers",
    "freeze_table",
    "set_trainable_",
    "trainable_universe",
    "unfreeze_all",
]


def set_trainable_(params: Iterable[nn.Parameter], trainable: bool) -> None:
    """Set ``requires_grad`` in place; freezing also drops any leftover gradient.

    A frozen parameter that still holds a gradient tensor (zeros after
    ``zero_grad(set_to_none=False)``) is *not* skipped by torch optimizers: AdamW would keep
    moving it with its stale momentum and apply weight decay. ``grad = None`` makes every torch
    optimizer skip it.

    Example::

        set_trainable_(model.lm_head.parameters(), False)
    """
    for p in params:
        p.requires_grad_(trainable)
        if not trainable:
            p.grad = None


def trainable_universe(model: nn.Module) -> list[str]:
    """Names of the parameters that "everything trainable" means for this model.

    A plain model: all parameters. A PEFT model: the adapter weights and the ``modules_to_save``
    copies, never the frozen base weights (training those would defeat the adapter).

    Example::

        trainable_universe(peft_model)  # ['base_model.model....lora_A.default.weight', ...]
    """
    prefix = peft_prefix(model)
    names = [n for n, _ in model.named_parameters()]
    if prefix is None:
        return names
    return [n for n in names if is_adapter_param(n, prefix)]


def _switchable(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The parameters of a part that ``part=False`` (make trainable) should switch on."""
    universe = set(trainable_universe(model))
    adapters = [n for n in names if n in universe]
    # On a PEFT model prefer the adapter/modules_to_save copies; fall back to the part's own
    # weights (e.g. a plain lm_head) but never PEFT's reference copy.
    return adapters or [n for n in names if not is_peft_original_copy(n)]


@dataclass
class FreezeReport:
    """Per-part table of trainable vs total parameters (tied weights counted once).

    Attributes:
        rows: ``(part, module path, trainable, total)`` bottom-to-top: vision (a multimodal
            model's vision tower), embeddings, blocks, norm, head, other.

    Example::

        report = freeze_table(model)
        print(report)            # aligned text table
        report.trainable         # total trainable parameters
    """

    rows: list[tuple[str, str, int, int]]

    @property
    def trainable(self) -> int:
        """Trainable parameters over all rows."""
        return sum(r[2] for r in self.rows)

    @property
    def total(self) -> int:
        """All parameters over all rows."""
        return sum(r[3] for r in self.rows)

    def frozen_parts(self) -> list[str]:
        """Parts whose parameters are all frozen."""
        return [r[0] for r in self.rows if r[3] and not r[2]]

    def __str__(self) -> str:
        def pct(t: int, n: int) -> str:
            return f"{100 * t / n:.1f}" if n else "-"

        header = ("part", "module", "trainable", "total", "%")
        body = [(p, m, f"{t:,}", f"{n:,}", pct(t, n)) for p, m, t, n in self.rows]
        body.append(("all", "", f"{self.trainable:,}", f"{self.total:,}", pct(self.trainable, self.total)))
        table = [header, *body]
        widths = [max(len(r[i]) for r in table) for i in range(5)]
        # Text columns left-aligned, numbers right-aligned.
        lines = [
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def freeze_table(model: nn.Module, info: LayerInfo | None = None) -> FreezeReport:
    """The current trainable/total table without changing anything.

    Example::

        print(freeze_table(model))
    """
    info = info or find_layers(model)
    params = dict(model.named_parameters())
    rows = []
    for key, names in info.groups.items():
        if key in ("other", "vision") and not names:
            continue
        if key.startswith("block."):
            label = info.blocks[int(key.split(".")[1])]
        else:
            label = ", ".join(getattr(info, key, ())) if key != "other" else "(rest)"
            if key == "head" and info.tied_head:
                label += " (tied to embeddings)"
        total = sum(params[n].numel() for n in names)
        trainable = sum(params[n].numel() for n in names if params[n].requires_grad)
        rows.append((key, label, trainable, total))
    return FreezeReport(rows)


def freeze_layers(
    model: nn.Module,
    *,
    ratio: float | None = None,
    first: int | None = None,
    last: int | None = None,
    indices: Sequence[int] | None = None,
    pattern: str | None = None,
    embeddings: bool | None = None,
    head: bool | None = None,
    vision_tower: bool | None = None,
    verbose: bool = False,
    info: LayerInfo | None = None,
) -> FreezeReport:
    """Freeze blocks (and optionally embeddings/head/vision tower) of any HF model in place.

    The block selectors combine as a union; blocks that are not selected keep their current
    state, so calls compose. On a PEFT model freezing a block freezes its adapters, and the
    base weights stay frozen whatever you pass.

    Args:
        model: plain or PEFT-wrapped HF model.
        ratio: freeze the bottom ``floor(ratio * num_blocks)`` blocks (0 <= ratio <= 1).
        first: freeze the first (bottom, input-side) ``first`` blocks.
        last: freeze the last (top) ``last`` blocks.
        indices: freeze these blocks; negative indices count from the top, middle ones are fine.
        pattern: also freeze every parameter whose name matches this regex (``re.search``).
        embeddings: True freezes the embeddings, False makes them trainable, None leaves them.
        head: the same for the output head. With tied embeddings both act on the shared weight,
            so conflicting values raise.
        vision_tower: the same for a vision-language model's vision encoder (LLaVA's
            ``vision_tower``, Qwen2-VL's ``visual``); the blocks that ``ratio``/``first``/...
            count are the language model's.
        verbose: print the resulting table.
        info: a precomputed :func:`find_layers` result.

    Returns:
        The per-part :class:`FreezeReport` after freezing.

    Raises:
        ValueError: invalid ratio/counts/pattern, conflicting tied embeddings/head, or
            ``vision_tower`` on a model without one.
        IndexError: an index outside the block range.

    Example::

        freeze_layers(model, indices=[0, 5, -1], embeddings=True, verbose=True)
        freeze_layers(peft_model, ratio=0.5)   # only the upper half of the LoRA adapters train
        freeze_layers(llava, vision_tower=True)  # the vision encoder, nothing else
    """
    info = info or find_layers(model)
    n = info.num_blocks
    chosen: set[int] = set()
    if ratio is not None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        chosen.update(range(int(ratio * n + 1e-9)))
    for label, count in (("first", first), ("last", last)):
        if count is not None and not 0 <= count <= n:
            raise ValueError(f"{label}={count} must be between 0 and the number of blocks ({n})")
    if first:
        chosen.update(range(first))
    if last:
        chosen.update(range(n - last, n))
    if indices is not None:
        chosen.update(info.block_indices(indices))
    regex = compile_pattern(pattern)
    if vision_tower is not None and not info.groups.get("vision"):
        raise ValueError(f"vision_tower={vision_tower}: {type(unwrap(model)).__name__} has no vision tower "
                         "(a module whose config is the model config's vision_config)")
    if info.tied_head and embeddings is not None and head is not None and embeddings != head:
        raise ValueError(
            "the head is tied to the input embeddings (one shared weight): "
            f"embeddings={embeddings} and head={head} cannot both hold"
        )

    params = dict(model.named_parameters())
    to_freeze = [name for i in sorted(chosen) for name in info.groups[f"block.{i}"]]
    if regex is not None:
        to_freeze += [name for name in params if regex.search(name)]
    to_enable: list[str] = []
    for part, flag in (("embeddings", embeddings), ("head", head), ("vision", vision_tower)):
        names = list(info.groups[part])
        if part == "head" and info.tied_head:
            names += info.groups["embeddings"]
        if flag is True:
            to_freeze += names
        elif flag is False:
            to_enable += _switchable(model, names)
    set_trainable_((params[name] for name in dict.fromkeys(to_enable)), True)
    set_trainable_((params[name] for name in dict.fromkeys(to_freeze)), False)
    report = freeze_table(model, info)
    if verbose:
        print(report)
    return report


def unfreeze_all(model: nn.Module, verbose: bool = False) -> FreezeReport:
    """Make the whole trainable universe trainable again (PEFT: adapters only, base stays frozen).

    Example::

        unfreeze_all(model)
    """
    params = dict(model.named_parameters())
    set_trainable_((params[n] for n in trainable_universe(model)), True)
    report = freeze_table(model)
    if verbose:
        print(report)
    return report
