"""The package layout holds: one package per feature, no import cycles, modules small enough to
read, no ``__module__`` relabelling, and the public imports users rely on keep working."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "forge"
FEATURES = ("core", "config", "ema", "layers", "loss", "monitor", "autotune", "trackers", "report",
            "models", "doctor", "recipes", "tune", "workflow", "cli")
MAX_LINES = 420  # "a module past ~400 lines is asking to be split" (STYLE.md)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """forge modules ``path`` imports (``from x import y`` counts y when x.y is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("forge"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("forge"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
    me = module_name(path)
    out = set()
    for name in found:
        # Importing forge.a.b runs forge/__init__ and forge/a/__init__ first: count those too,
        # except a module's own parent packages (already running when it is imported).
        parts = name.split(".")
        for i in range(2, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate in known and candidate != me and not me.startswith(candidate + "."):
                out.add(candidate)
    return out


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    return {module_name(p): _imports(p, top_level_only) for p in sorted(PACKAGE.rglob("*.py"))}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles_between_modules():
    cycle = _cycle(_graph(top_level_only=True))
    assert cycle is None, " -> ".join(cycle)


def test_no_import_cycles_between_feature_packages_even_through_lazy_imports():
    # A lazy import inside a function is still a dependency: two feature packages must not
    # need each other. (forge/__init__ re-exports everything lazily, by name: not an edge.)
    modules = _graph(top_level_only=False)
    packages: dict[str, set[str]] = {}
    for mod, deps in modules.items():
        if mod == "forge" or mod.count(".") == 0:
            continue
        src = mod.split(".")[1]
        for dep in deps:
            if dep.count(".") >= 1 and dep.split(".")[1] != src:
                packages.setdefault(src, set()).add(dep.split(".")[1])
    cycle = _cycle(packages)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_core_imports_no_feature_package():
    for path in (PACKAGE / "core").glob("*.py"):
        for dep in _imports(path, top_level_only=False):
            assert dep.split(".")[1] in ("core", "errors"), f"{path.name} imports {dep}"


def test_one_package_per_feature_and_no_loose_feature_modules():
    for name in FEATURES:
        assert (PACKAGE / name / "__init__.py").is_file(), name
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "errors.py"], loose


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_small_enough_to_read(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines"


def test_no_module_relabelling():
    for path in PACKAGE.rglob("*.py"):
        assert "__module__ =" not in path.read_text(), path


@pytest.mark.parametrize("name", [
    "load_preset", "Preset", "list_presets", "train", "build_trainer", "load_examples", "load_model",
    "EMAWeights", "EMACallback", "find_layers", "freeze_layers", "LISACallback", "layerwise_lr_groups",
    "suggest_freeze", "fused_linear_cross_entropy", "AdaptiveLoss", "GradientMonitor", "MonitorConfig",
    "autotune_batch_size", "autotune_preset", "ForgeTensorBoardCallback", "write_report", "ForgeError",
    "merge_run", "generate_run", "evaluate_run",
])
def test_public_names_import_from_forge(name):
    import forge

    assert getattr(forge, name) is not None
    assert name in dir(forge)


def test_feature_packages_expose_their_public_face():
    from forge.autotune import AutotuneConfig, autotune_batch_size  # noqa: F401
    from forge.config import DataConfig, ModelConfig, load_preset  # noqa: F401
    from forge.ema import EMACallback, EMAConfig, EMAWeights  # noqa: F401
    from forge.layers import FreezeConfig, GradualUnfreezingCallback, find_layers  # noqa: F401
    from forge.loss import AdaptiveLoss, LossConfig, focal  # noqa: F401
    from forge.monitor import GradientMonitor, MonitorConfig  # noqa: F401
    from forge.recipes import build_trainer, train  # noqa: F401
    from forge.report import load_run, write_report  # noqa: F401
    from forge.trackers import ForgeTensorBoardCallback, parse_trackers  # noqa: F401


def test_shared_names_are_defined_once():
    # The preset file name, the forge/ prefix and the unwrapper each live in forge.core.
    for needle in ('PRESET_FILE = "', 'PREFIX = "forge/"', "def unwrap(", "def json_safe("):
        owners = [p for p in PACKAGE.rglob("*.py") if needle in p.read_text()]
        assert len(owners) == 1 and owners[0].parent.name == "core", (needle, owners)
