"""Layer discovery, the one grouper every forge feature shares: which blocks, embeddings, norm and
head a model has, and which group each parameter belongs to.

``find_layers`` finds the repeated transformer blocks by structure (the longest ``nn.ModuleList``
of identical blocks, per encoder/decoder; inside the language model on a multimodal model), the
embeddings, the final norm, the head and a vision tower. Freezing, schedules, layer-wise LR,
the gradient monitor and EMA all read the same :class:`LayerInfo`.

On a vision-language model (LLaVA, Qwen2-VL, ...) the vision encoder is often the longest
stack; the blocks are taken from the language model instead (``get_decoder()``, or, failing
that, any stack outside the vision tower), and the tower's parameters form their own group,
``vision``, that freezing can address on purpose. The tower is the module whose ``config`` is
the model config's vision part (``config.vision_config``).

Everything here works from module structure and the generic ``PreTrainedModel`` API
(``get_input_embeddings``, ``get_output_embeddings``, ``base_model``, ``get_encoder``,
``get_decoder``, the config's sub-configs), never from a per-architecture table, so new HF
architectures work without changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from forge.core.unwrap import is_peft_model, unwrap

# PEFT keeps an untouched copy of every `modules_to_save` module next to the trained one.
_PEFT_ORIGINAL = ".original_module."
_PEFT_TO_SAVE = ".modules_to_save."


def peft_prefix(model: nn.Module) -> str | None:
    """The tuner's parameter-name prefix (``"lora_"`` for LoRA) or None for a plain model."""
    for module in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        if module is not None and is_peft_model(module):
            return getattr(module.base_model, "prefix", None)
    return None


def is_adapter_param(name: str, prefix: str | None) -> bool:
    """True if a PEFT model would train this parameter (adapter weight or modules_to_save copy)."""
    if prefix is None:
        return False
    if _PEFT_TO_SAVE in name:
        return True
    return any(part.startswith(prefix) for part in name.split("."))


def is_peft_original_copy(name: str) -> bool:
    """True for PEFT's frozen reference copy of a ``modules_to_save`` module (never trained)."""
    return _PEFT_ORIGINAL in name


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        return False
    first = type(module[0])
    return all(type(m) is first for m in module) and any(True for _ in module.parameters())


def candidate_stacks(root: nn.Module) -> list[str]:
    """Module paths of outermost lists of identical, parameterised blocks, in registration order."""
    found: list[str] = []
    for name, module in root.named_modules():
        if not _is_block_list(module):
            continue
        # A list nested inside a block (MoE experts, T5's per-block `layer`) is part of that block.
        if any(name.startswith(outer + ".") for outer in found):
            continue
        found.append(name)
    return found


def _stack_key(root: nn.Module, path: str) -> tuple[int, int]:
    stack = root.get_submodule(path)
    return len(stack), sum(p.numel() for p in stack.parameters())


def _path_of(root: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in root.named_modules(remove_duplicate=False):
        if module is target:
            return name
    return None


def _inside(path: str, outer: str) -> bool:
    return outer == "" or path == outer or path.startswith(outer + ".")


def vision_towers(hf_model: nn.Module) -> list[str]:
    """Module paths of a multimodal model's vision encoder(s): the outermost modules whose
    ``config`` is a vision part of the model's config (``vision_config``); ``[]`` on a text model.

    Example::

        vision_towers(llava)   # ['model.vision_tower']
    """
    config = getattr(hf_model, "config", None)
    if config is None:
        return []
    keys = set(getattr(config, "sub_configs", None) or {}) | set(vars(config))
    parts = [sub for key in sorted(keys) if "vision" in key
             and (sub := getattr(config, key, None)) is not None and sub is not config and hasattr(sub, "to_dict")]
    found: list[str] = []
    for name, module in hf_model.named_modules():
        if name and any(getattr(module, "config", None) is sub for sub in parts) \
                and not any(_inside(name, outer) for outer in found):
            found.append(name)
    return found


def _getter_path(hf_model: nn.Module, getter: str) -> str | None:
    try:
        sub = getattr(hf_model, getter)()
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return None
    return _path_of(hf_model, sub) if isinstance(sub, nn.Module) else None


def select_stacks(hf_model: nn.Module) -> list[str]:
    """Pick the transformer block lists: the longest list of identical blocks, per encoder/decoder,
    inside the language model of a multimodal model.

    Args:
        hf_model: the unwrapped HF model.

    Returns:
        Module paths relative to ``hf_model``, input side first.
    """
    candidates = candidate_stacks(hf_model)
    if not candidates:
        raise ValueError(
            f"{type(hf_model).__name__}: found no nn.ModuleList of identical blocks; "
            "this model has no repeated transformer layers to freeze."
        )
    towers = vision_towers(hf_model)
    outside = [c for c in candidates if not any(_inside(c, t) for t in towers)]
    # A vision encoder's blocks are never the trunk the features act on (when anything else is left).
    candidates = outside or candidates
    config = getattr(hf_model, "config", None)
    parts: list[str] = []
    if getattr(config, "is_encoder_decoder", False):
        # Encoder and decoder blocks often differ in class (BART) or count (T5 variants).
        parts = [p for g in ("get_encoder", "get_decoder") if (p := _getter_path(hf_model, g)) is not None]
    else:
        # The language model of a multimodal model (`model.language_model`); on a plain
        # decoder this is the base model, which holds every candidate anyway.
        decoder = _getter_path(hf_model, "get_decoder")
        if decoder and any(_inside(c, decoder) for c in candidates):
            candidates = [c for c in candidates if _inside(c, decoder)]
    chosen: list[str] = []
    if parts:
        for part in parts:
            inside = [c for c in candidates if part == "" or c.startswith(part + ".")]
            if inside:
                chosen.append(max(inside, key=lambda c: _stack_key(hf_model, c)))
    if not chosen:
        best = max(candidates, key=lambda c: _stack_key(hf_model, c))
        block_cls = type(hf_model.get_submodule(best)[0])
        # Other outermost lists of the same block class belong to the same trunk (T5 encoder/decoder).
        chosen = [c for c in candidates if type(hf_model.get_submodule(c)[0]) is block_cls]
    return sorted(dict.fromkeys(chosen), key=candidates.index)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def group_parameters(
    root: nn.Module, hf_model: nn.Module, stacks: list[str]
) -> tuple[dict[str, list[str]], list[str], dict[str, list[str]], bool]:
    """Assign every parameter of ``root`` to one group.

    Returns:
        ``(groups, block_paths, module_paths, tied_head)`` where ``groups`` maps group keys
        (``"vision"``, ``"embeddings"``, ``"block.<i>"``, ``"norm"``, ``"head"``, ``"other"``) to
        parameter names relative to ``root``; ``block_paths`` are the block module paths relative
        to ``root``; ``module_paths`` maps ``vision``/``embeddings``/``norm``/``head`` to module
        paths relative to ``root``.
    """
    prefix = _path_of(root, hf_model) or ""
    join = (lambda p: f"{prefix}.{p}" if p else prefix) if prefix else (lambda p: p)

    blocks: list[nn.Module] = []
    block_paths: list[str] = []
    for stack in stacks:
        for i, block in enumerate(hf_model.get_submodule(stack)):
            blocks.append(block)
            block_paths.append(join(f"{stack}.{i}"))
    owner: dict[int, str] = {}
    for i, block in enumerate(blocks):
        for p in block.parameters():
            owner.setdefault(id(p), f"block.{i}")
    towers = [hf_model.get_submodule(t) for t in vision_towers(hf_model)]
    for tower in towers:
        for p in tower.parameters():
            owner.setdefault(id(p), "vision")
    # The vision tower's own patch embeddings and norms are the tower's, not the language model's.
    in_blocks = {id(m) for b in [*blocks, *towers] for m in b.modules()}

    modules: dict[str, list[nn.Module]] = {"vision": towers, "embeddings": [], "head": [], "norm": []}
    get_in = getattr(hf_model, "get_input_embeddings", None)
    input_emb = get_in() if callable(get_in) else None
    if input_emb is not None:
        modules["embeddings"].append(input_emb)
        parent = _parent_of(hf_model, input_emb)
        # A dedicated embeddings container (BERT's `embeddings` with its LayerNorm) belongs whole.
        if parent is not None and parent is not hf_model and not any(id(m) in in_blocks for m in parent.modules()):
            modules["embeddings"].append(parent)
    for module in hf_model.modules():
        if isinstance(module, nn.Embedding) and id(module) not in in_blocks:
            modules["embeddings"].append(module)

    get_out = getattr(hf_model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        modules["head"].append(out_emb)
    base = getattr(hf_model, "base_model", hf_model)
    if base is not hf_model:
        # Task heads (classifier, score, qa_outputs) live outside the backbone.
        modules["head"].extend(child for child in hf_model.children() if child is not base)
    for module in hf_model.modules():
        if _is_norm(module) and id(module) not in in_blocks:
            modules["norm"].append(module)

    for key in ("embeddings", "head", "norm"):
        for module in modules[key]:
            for p in module.parameters():
                owner.setdefault(id(p), key)
    emb_ids = {id(p) for m in modules["embeddings"] for p in m.parameters()}
    tied_head = any(id(p) in emb_ids for m in modules["head"] for p in m.parameters())

    groups: dict[str, list[str]] = {"vision": [], "embeddings": []}
    groups.update({f"block.{i}": [] for i in range(len(blocks))})
    groups.update({"norm": [], "head": [], "other": []})
    for name, p in root.named_parameters():
        groups[owner.get(id(p), "other")].append(name)
    paths: dict[str, list[str]] = {}
    for key, mods in modules.items():
        # Keep the modules that own parameters of this group (a tied lm_head shows as head),
        # outermost only: `bert.embeddings` stands for its children.
        kept = [
            path
            for m in dict.fromkeys(mods)
            if any(owner.get(id(p)) == key or (key == "head" and tied_head) for p in m.parameters())
            and (path := _path_of(root, m)) is not None
        ]
        paths[key] = [p for p in kept if not any(p.startswith(q + ".") for q in kept if q != p)]
    return groups, block_paths, paths, tied_head


def _parent_of(root: nn.Module, target: nn.Module) -> nn.Module | None:
    for module in root.modules():
        if any(child is target for child in module.children()):
            return module
    return None


def compile_pattern(pattern: str | None) -> re.Pattern[str] | None:
    """Compile a user regex once, with an error message that names the offending pattern."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"freeze pattern {pattern!r} is not a valid regular expression: {err}") from err


@dataclass(frozen=True)
class LayerInfo:
    """Where the blocks, embeddings, final norm and head of a model are.

    Parameter names are relative to the model passed to :func:`find_layers` (so they carry
    ``base_model.model.`` on a PEFT model); tied weights appear once, under ``embeddings``.

    Attributes:
        stacks: module paths of the block lists, input side first (T5: encoder then decoder).
        blocks: module path of every block, bottom (input side) first; block ``i`` is ``blocks[i]``.
        block_stack: for each block, the index of its stack in ``stacks``.
        embeddings, norm, head: module paths of those parts.
        tied_head: True when the output head shares its weight with the input embeddings.
        groups: parameter names per group: ``vision``, ``embeddings``, ``block.<i>``, ``norm``,
            ``head``, ``other`` (``vision`` is empty on a text model).
        vision: module paths of a multimodal model's vision tower(s), ``()`` on a text model.

    Example::

        info = find_layers(model)
        info.num_blocks, info.groups["block.0"][:2], info.tied_head
    """

    stacks: tuple[str, ...]
    blocks: tuple[str, ...]
    block_stack: tuple[int, ...]
    embeddings: tuple[str, ...]
    norm: tuple[str, ...]
    head: tuple[str, ...]
    tied_head: bool
    groups: dict[str, tuple[str, ...]] = field(repr=False)
    vision: tuple[str, ...] = ()

    @property
    def num_blocks(self) -> int:
        """Number of transformer blocks over all stacks."""
        return len(self.blocks)

    def group_of(self) -> dict[str, str]:
        """Map parameter name -> group key (the inverse of ``groups``)."""
        return {name: key for key, names in self.groups.items() for name in names}

    def block_indices(self, indices: Iterable[int]) -> list[int]:
        """Normalise block indices (negative counts from the top) and check their range.

        Raises:
            IndexError: an index outside ``[-num_blocks, num_blocks)``.
        """
        n = self.num_blocks
        out = []
        for i in indices:
            if not -n <= int(i) < n:
                raise IndexError(f"block index {i} out of range for a model with {n} blocks")
            out.append(int(i) % n)
        return sorted(set(out))


def find_layers(model: nn.Module) -> LayerInfo:
    """Discover the repeated blocks, embeddings, final norm and head of any HF model.

    Works through PEFT, ``torch.compile`` and DDP wrappers; encoder-decoder models get one stack
    per side, encoder first; on a vision-language model the blocks are the language model's and
    the vision tower is the ``vision`` group.

    Args:
        model: a ``PreTrainedModel``, ``PeftModel`` or a wrapper around one.

    Returns:
        A :class:`LayerInfo` whose names are relative to ``model``.

    Raises:
        ValueError: the model has no list of identical blocks.

    Example::

        info = find_layers(AutoModelForCausalLM.from_config(cfg))
        print(info.num_blocks, info.embeddings, info.head)
    """
    hf = unwrap(model)
    stacks = select_stacks(hf)
    groups, block_paths, paths, tied = group_parameters(model, hf, stacks)
    prefix = next((n for n, m in model.named_modules() if m is hf), "")
    stack_paths = tuple(f"{prefix}.{s}" if prefix else s for s in stacks)
    block_stack = tuple(next(j for j, s in enumerate(stack_paths) if b.startswith(s + ".")) for b in block_paths)
    return LayerInfo(
        stacks=stack_paths,
        blocks=tuple(block_paths),
        block_stack=block_stack,
        embeddings=tuple(paths["embeddings"]),
        norm=tuple(paths["norm"]),
        head=tuple(paths["head"]),
        tied_head=tied,
        groups={k: tuple(v) for k, v in groups.items()},
        vision=tuple(paths["vision"]),
    )
