"""The package layering holds: no import cycle between posttrain's subpackages (and top-level
modules), and the model layer imports nothing from rollout/ or train/.

Every `import` / `from ... import` in posttrain counts, function-level ones included (a lazy
import hides a cycle from the interpreter, not from a reader).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "posttrain"

# An arrow that closes a cycle today, with why and what removes it. Keep this empty: an entry
# here is debt, and the test fails once the arrow is gone so the entry cannot outlive it.
KNOWN_CYCLE_ARROWS: dict[tuple[str, str], str] = {}
FORBIDDEN = {("models", "rollout"), ("models", "train")}


def unit(module: str) -> str | None:
    """The layer of a dotted posttrain module: its subpackage, or the top-level module name."""
    parts = module.split(".")
    if parts[0] != "posttrain" or len(parts) < 2:
        return None
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def arrows() -> dict[tuple[str, str], list[str]]:
    """(from layer, to layer) -> the files that make the arrow."""
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        source = unit(name)
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".")
                    base = base if is_package else base[:-1]
                    base = base[: len(base) - node.level + 1]
                    targets = [".".join([*base, *([node.module] if node.module else [])])]
                else:
                    targets = [node.module or ""]
            for target in targets:
                layer = unit(target)
                if layer is not None and source is not None and layer != source:
                    found[(source, layer)].append(str(path.relative_to(PACKAGE.parent)))
    return found


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one layer (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_layers():
    found = arrows()
    edges = set(found) - set(KNOWN_CYCLE_ARROWS)
    loops = cycles(edges)
    detail = {
        " <-> ".join(c): {f"{a}->{b}": found[(a, b)] for a, b in edges if a in c and b in c}
        for c in loops
    }
    assert not loops, f"import cycles between posttrain layers: {detail}"
    stale = [arrow for arrow in KNOWN_CYCLE_ARROWS if arrow not in found]
    assert not stale, f"KNOWN_CYCLE_ARROWS lists arrows that no longer exist: {stale}"


def test_models_import_nothing_from_rollout_or_train():
    found = arrows()
    bad = {f"{a}->{b}": found[(a, b)] for a, b in FORBIDDEN if (a, b) in found}
    assert not bad, f"the model layer must not import rollout/ or train/: {bad}"


def test_the_checker_sees_cycles():
    """The cycle finder itself: a two-layer loop and a three-layer loop are found."""
    assert cycles({("a", "b"), ("b", "a"), ("b", "c")}) == [["a", "b"]]
    assert cycles({("a", "b"), ("b", "c"), ("c", "a")}) == [["a", "b", "c"]]
    assert cycles({("a", "b"), ("b", "c")}) == []
