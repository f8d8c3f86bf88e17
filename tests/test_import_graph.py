"""No import circle between saescope modules (issue 16): lower layers never import higher ones.

The graph is read from the source with ``ast``: every ``import`` and ``from … import`` of a saescope module,
at module level and inside functions, relative imports resolved; a ``from package import name`` that names a
submodule points at that submodule. Imports under ``if TYPE_CHECKING:`` are left out (they never run: type
hints only). The package ``saescope`` itself is a node, so a module importing ``from saescope import …``
while the package's ``__init__`` imports that module is a circle too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "saescope"


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _runtime_nodes(tree: ast.AST):
    """Every node except those inside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_names(root)

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(kept + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                found = owner(target) if target.split(".")[0] == "saescope" else None
                if found is not None and found != name:
                    graph[name].add(found)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, …, a]``, or None (depth-first search with colours)."""
    colour = dict.fromkeys(graph, 0)
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        trail.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return trail[trail.index(nxt):] + [nxt]
            if colour[nxt] == 0 and (cycle := visit(nxt)):
                return cycle
        colour[node] = 2
        trail.pop()
        return None

    for start in sorted(graph):
        if colour[start] == 0 and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_circle_between_saescope_modules():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100      # the whole package was read
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " → ".join(cycle)


def test_the_checker_finds_circles_in_function_bodies_relative_imports_and_the_package(tmp_path):
    pkg = tmp_path / "saescope"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from saescope.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                      "    from saescope.a import f\nimport json\n")
    graph = import_graph(pkg)
    assert graph["saescope"] == {"saescope.a"} and graph["saescope.a"] == {"saescope.sub.b"}
    assert find_cycle(graph) is None                        # the TYPE_CHECKING import does not count
    (pkg / "sub" / "b.py").write_text("def g():\n    from .. import a\n")       # relative, in a function
    assert find_cycle(import_graph(pkg)) == ["saescope.a", "saescope.sub.b", "saescope.a"]
    (pkg / "sub" / "b.py").write_text("from saescope import __version__\n")    # the package's top level
    assert find_cycle(import_graph(pkg)) == ["saescope", "saescope.a", "saescope.sub.b", "saescope"]
