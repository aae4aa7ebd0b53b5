"""YAML read within a budget: the safe loader, with limits on size, nesting and aliases, and
no silently repeated keys.

The safe loader builds an alias (``*a``) as a reference to the anchored value, so a "billion
laughs" document (nine levels of ten aliases each) loads in microseconds as a small graph;
what hangs is whatever walks it later (formatting a value for an error message, a deep copy,
a dump), which sees 10**9 strings. forge measures the size the document would have with every
alias written out, on the parsed nodes before anything is built from them, and refuses one
past :data:`MAX_EXPANDED`. A key given twice in one mapping is refused too: YAML would keep
the last one without a word (``learning_rate`` set twice in a hurry).

Example:
    >>> load_yaml("a: &x [1, 2]\\nb: *x\\n", "p.yaml")
    {'a': [1, 2], 'b': [1, 2]}
"""

from __future__ import annotations

from typing import Any

import yaml

from forge.errors import ForgeError

#: Largest YAML text forge reads: a preset is a few kB, and parsing costs ~0.1 ms per value.
MAX_BYTES = 256 * 1024
#: Largest document with every alias expanded, in values plus characters of text.
MAX_EXPANDED = 2_000_000
#: Deepest nesting: open brackets, and columns of indentation (block nesting needs one each).
MAX_DEPTH = 100
MAX_INDENT = 400
# libyaml when present: the pure-Python scanner needs ~10 s for 40k list items on a busy CPU.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _too_deep(text: str) -> bool:
    """A cheap look at nesting before parsing (the parsers recurse, and slow down, with depth).

    Brackets inside quoted strings count too; a real preset is never near either limit.
    """
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}" and depth:
            depth -= 1
    indent = max((len(line) - len(line.lstrip(" \t")) for line in text.splitlines()), default=0)
    return deepest > MAX_DEPTH or indent > MAX_INDENT


def _check_nodes(root: yaml.Node, source: str) -> None:
    """Refuse a node graph that expands past the budget, refers to itself, or repeats a key.

    Shared nodes (aliases) are measured once (memo by id) and counted each time they are
    referenced, so a bomb is measured in time proportional to its text, not its expansion.
    """
    memo: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node) -> int:
        if isinstance(node, yaml.ScalarNode):
            return 1 + len(node.value)
        key = id(node)
        if key in memo:
            return memo[key]
        if key in on_path:
            raise ForgeError(f"{source}: line {node.start_mark.line + 1}: a YAML alias refers to "
                             "the value that contains it")
        on_path.add(key)
        if isinstance(node, yaml.MappingNode):
            _no_repeated_keys(node, source)
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_EXPANDED:
                break  # the verdict is known; do not walk the rest
        on_path.discard(key)
        memo[key] = total
        return total

    if size(root) > MAX_EXPANDED:
        raise ForgeError(f"{source}: YAML aliases expand to more than {MAX_EXPANDED} values "
                         "(a 'billion laughs' document?); write the values out instead")


def _no_repeated_keys(node: yaml.MappingNode, source: str) -> None:
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.value == "<<":  # merge keys may override
            continue
        line = key.start_mark.line + 1
        if key.value in seen:
            raise ForgeError(f"{source}: line {line}: key '{key.value[:80]}' is given twice (also "
                             f"on line {seen[key.value]}); YAML would keep only the last one")
        seen[key.value] = line


def load_yaml(text: str, source: str) -> Any:
    """What ``yaml.safe_load(text)`` gives, refusing a document too large, too deep, that
    aliases expand past :data:`MAX_EXPANDED`, or that gives a key twice.

    Args:
        text: the YAML text.
        source: what to name in errors (a file, or ``--set KEY``).

    Raises:
        ForgeError: the budget is exceeded, or a key repeated (one line naming ``source``).
        yaml.YAMLError: the text is not valid YAML (callers report where).
    """
    if len(text) > MAX_BYTES:
        raise ForgeError(f"{source}: {len(text)} characters of YAML is more than forge reads "
                         f"({MAX_BYTES}); a preset is a few kB")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a command-line argument of bytes that are not UTF-8
        raise ForgeError(f"{source}: not UTF-8 text") from None
    if _too_deep(text):
        raise ForgeError(f"{source}: YAML nested too deeply (more than {MAX_DEPTH} levels)")
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise ForgeError(f"{source}: YAML nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise ForgeError(f"{source}: invalid YAML: {str(err).splitlines()[0]}") from None
    finally:
        loader.dispose()
