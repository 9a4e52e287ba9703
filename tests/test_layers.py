"""The import graph of lowmem (with kernels/ as lowmem.kernels): no cycle, and every import runs down the layer
order that lowmem/README.md writes in its `layers` block. Imports inside functions count (they hold cycles as
much as top-level ones); imports under `if TYPE_CHECKING:` do not (they never run)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lowmem": ROOT / "lowmem", "lowmem.kernels": ROOT / "kernels"}


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    return skipped


def imported_names(name: str, path: Path) -> set[str]:
    """Every dotted name `name` imports: modules, and module.attribute for `from module import attribute`."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph = {}
    for name, path in modules.items():
        targets = {owner(n) for n in imported_names(name, path) if n == "lowmem" or n.startswith("lowmem.")}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_order() -> dict[str, int]:
    """Module prefix -> layer, from the ```layers block of lowmem/README.md (one layer a line, lowest first)."""
    text = (ROOT / "lowmem" / "README.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "lowmem/README.md has no ```layers block"
    order = {}
    for level, line in enumerate(l for l in block.group(1).splitlines() if l.strip()):
        for prefix in line.split(":", 1)[1].split():
            order[prefix] = level
    return order


def layer_of(module: str, order: dict[str, int]) -> int:
    prefix = module
    while prefix not in order:
        assert "." in prefix, f"{module}: no layer in lowmem/README.md's layers block names it or a package above it"
        prefix = prefix.rpartition(".")[0]
    return order[prefix]


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lowmem.a import A\n"
                    "def f():\n    from lowmem.b import c\n    import lowmem.d\n")
    names = imported_names("lowmem.x.m", path)
    assert {"lowmem.b", "lowmem.b.c", "lowmem.d"} <= names and not any(n.startswith("lowmem.a") for n in names)


def test_cycles_finds_a_cycle_and_only_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_lowmem_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_module_has_a_layer():
    order = layer_order()
    for module in import_graph():
        layer_of(module, order)


def test_imports_run_down_the_layer_order():
    order = layer_order()
    upward = [f"{a} (layer {layer_of(a, order)}) imports {b} (layer {layer_of(b, order)})"
              for a, targets in sorted(import_graph().items()) for b in sorted(targets)
              if layer_of(b, order) > layer_of(a, order)]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


@pytest.mark.parametrize("leaf", ["lowmem.errors", "lowmem.config.schema", "lowmem.optim.options"])
def test_leaves_import_only_the_errors(leaf):
    assert import_graph()[leaf] <= {"lowmem.errors"}
