"""The layers of the project: ``utils < data, models < engine < cli < train.py / tools``.

Every import of every project module (read with ``ast``, function-level imports included) may only go to its
own package or to a lower layer, and the packages import each other without cycles. ``cli.flags`` (the parser)
imports no torch."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Dict, Iterator, Set, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: package -> layer; a module may import its own package and packages of a lower layer.
LAYERS: Dict[str, int] = {"utils": 0, "data": 1, "models": 1, "engine": 2, "cli": 3, "tools": 4, "demo": 4}
TOP_MODULES = ("train.py",)  # the top of the program: may import every package

# Known upward imports: none (an entry here would be a (module path, imported module) pair).
KNOWN_EXCEPTIONS: Set[Tuple[str, str]] = set()


def _modules() -> Iterator[Tuple[str, str]]:
    """(path relative to the repository, package) of every project module."""
    for pkg in LAYERS:
        for dirpath, _, files in os.walk(os.path.join(REPO, pkg)):
            for f in sorted(files):
                if f.endswith(".py"):
                    yield os.path.relpath(os.path.join(dirpath, f), REPO), pkg
    for f in TOP_MODULES:
        yield f, ""


def _imports(path: str) -> Iterator[str]:
    """Every absolute import of ``path``, as the dotted module name (relative imports stay in the package)."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module


def _edges() -> Dict[Tuple[str, str], Set[str]]:
    """(importing package, imported package) -> the modules with such an import."""
    out: Dict[Tuple[str, str], Set[str]] = {}
    for path, pkg in _modules():
        for name in _imports(path):
            top = name.split(".")[0]
            if top in LAYERS and top != pkg and (path, name) not in KNOWN_EXCEPTIONS:
                out.setdefault((pkg, top), set()).add(f"{path}: import {name}")
    return out


def test_no_upward_import():
    bad = []
    for (src, dst), where in sorted(_edges().items()):
        if src and LAYERS[dst] >= LAYERS[src]:
            bad += sorted(where)
    assert not bad, "imports against the layers utils < data, models < engine < cli < train.py/tools:\n" + \
        "\n".join(bad)


def test_no_package_cycle():
    graph: Dict[str, Set[str]] = {}
    for (src, dst) in _edges():
        if src:
            graph.setdefault(src, set()).add(dst)

    def reaches(a: str, b: str, seen: Set[str]) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen | {n})) for n in graph.get(a, ()))

    cycles = sorted(p for p in graph if reaches(p, p, set()))
    assert not cycles, f"packages in an import cycle: {cycles}"


def test_known_exceptions_still_exist():
    """An exception that no longer occurs must leave the list (so that the rule tightens by itself)."""
    present = {(path, name) for path, _ in _modules() for name in _imports(path)}
    assert KNOWN_EXCEPTIONS <= present, sorted(KNOWN_EXCEPTIONS - present)


@pytest.mark.parametrize("code", [
    "import cli.flags; cli.flags.build_parser()",
    "import cli.flags; cli.flags.build_parser().parse_args(['--dataset', 'dtd', '--lr', '0.1'])",
])
def test_the_parser_imports_no_torch(code):
    probe = code + "; import sys; print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
