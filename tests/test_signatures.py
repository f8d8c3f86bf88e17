"""Issue 16's size rules, checked on the source: no function outside saescope/cli.py takes more than 12
parameters (typed option objects carry the rest), and no class is longer than 300 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "saescope"
MAX_PARAMETERS, MAX_CLASS_LINES = 12, 300


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Positional-only, positional, keyword-only, ``*args`` and ``**kwargs``; a method's self/cls not counted."""
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args]
    count = len(names) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    return count - (1 if names and names[0] in ("self", "cls") else 0)


def oversized(source: str, label: str) -> tuple[list[str], list[str]]:
    """``(functions with too many parameters, classes with too many lines)`` of one module's source."""
    functions, classes = [], []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and parameter_count(node) > MAX_PARAMETERS:
            functions.append(f"{label}:{node.name} takes {parameter_count(node)} parameters")
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
            classes.append(f"{label}:{node.name} is {node.end_lineno - node.lineno + 1} lines")
    return functions, classes


def test_no_long_parameter_lists_and_no_huge_classes():
    functions, classes = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        label = str(path.relative_to(PACKAGE.parent))
        f, c = oversized(path.read_text(), label)
        if path.name != "cli.py" or path.parent != PACKAGE:
            functions += f
        classes += c
    assert not functions, "\n".join(functions)
    assert not classes, "\n".join(classes)


def test_the_checks_see_what_they_should():
    wide = "def f(a, b, c, d, e, f, g, h, i, j, k, l, m):\n    pass\n"
    method = "class A:\n    def f(self, a, b, c, d, e, f, g, h, i, j, k, l):\n        pass\n"
    star = "def f(a, *args, b, c, d, e, f, g, h, i, j, k, **kw):\n    pass\n"
    assert oversized(wide, "x")[0] == ["x:f takes 13 parameters"]
    assert oversized(method, "x")[0] == []                      # 12 besides self
    assert oversized(star, "x")[0] == ["x:f takes 13 parameters"]
    long_class = "class Big:\n" + "    x = 1\n" * 300
    assert oversized(long_class, "x")[1] == ["x:Big is 301 lines"]
