"""The package's layering: lower layers never import higher ones, and no module imports
itself round a circle (``TYPE_CHECKING`` and function-level imports count too).

The layers, lowest first, are ``LAYERS``; each names top-level modules and packages of
``mirrorrouter/``. A module may import modules of its own layer or a lower one; a new
top-level module or package fails here until it is given a layer, so the tree keeps
saying how the code depends on itself (docs/architecture.md draws the same picture).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mirrorrouter"

LAYERS: tuple[tuple[str, ...], ...] = (
    # vocabulary: no knowledge of anything else in the gateway
    ("__init__", "errors", "reference", "timing", "headers", "logs", "sizes"),
    ("config",),
    # what requests, manifests and routes are; what is counted
    ("oci", "manifests", "mapping", "metrics"),
    ("cache",),
    ("coordination",),
    ("served",),  # the typed answers of every target
    ("upstream", "access"),
    ("pull",),
    ("hosted",),
    ("api", "server"),
    ("app",),
    ("cli", "__main__"),
)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The package's modules that ``name`` imports, wherever the import statement is."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # ``from package import module`` imports the module; ``from m import name``, m
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                yield target


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imports(name, path, known)) for name, path in known.items()}


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for rank, members in enumerate(LAYERS):
        if top in members:
            return rank
    raise AssertionError(f"{module}: its top-level name {top!r} is in no layer of LAYERS")


def test_every_module_has_a_layer() -> None:
    """Every top-level module and package of mirrorrouter/ is placed in a layer."""
    for module in modules():
        layer_of(module)


def test_no_module_imports_a_higher_layer() -> None:
    """Imports go down (or sideways within a layer), never up: manifests and cache know
    nothing of pull, upstream nothing of api, nothing but the CLI of the commands."""
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in sorted(graph().items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports that go up:\n" + "\n".join(upward)


def test_no_import_circles() -> None:
    """No module reaches itself through its imports (Tarjan's strongly connected
    components of the import graph, type-checking and lazy imports included)."""
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_graph_sees_imports() -> None:
    """The check is not vacuous: known imports, a lazy and a type-checking one among
    them, are edges of the graph."""
    edges = graph()
    assert "mirrorrouter.pull.site" in edges["mirrorrouter.pull.pullthrough"]
    assert "mirrorrouter.errors" in edges["mirrorrouter.reference"] | edges["mirrorrouter.oci"]
