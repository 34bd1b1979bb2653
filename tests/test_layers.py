"""The layers of the project: ``utils < methods < data, models < engine < cli < train.py / tools``.

Every import of every project module (read with ``ast``, function-level imports included) may only go to its
own package or to a lower layer, and the packages import each other without cycles; the library layers (below
``cli/``) never import argparse. Reading flags imports no torch: the parser and its validation (``cli.flags``,
the method registry ``methods``), the results tables (``engine.tables``) and ``tools/run_table.py`` reading
every launcher's flags."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Dict, Iterator, Set, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: package -> layer; a module may import its own package and packages of a lower layer.
LAYERS: Dict[str, int] = {"utils": 0, "methods": 1, "data": 2, "models": 2, "engine": 3, "cli": 4, "tools": 5,
                          "demo": 5}
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
    assert not bad, "imports against the layers utils < methods < data, models < engine < cli < train.py/tools:\n" + \
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


#: the library layers: they take specs or keyword arguments; flags are parsed above them (cli/, train.py, tools/).
LIBRARY_PACKAGES = ("utils", "methods", "data", "models", "engine")


def test_library_layers_parse_no_flags():
    """No module of the library layers imports argparse: no flag namespace is built or passed below ``cli/``
    (command-line front ends such as the synthetic-data writer live in ``tools/``)."""
    bad = [path for path, pkg in _modules() if pkg in LIBRARY_PACKAGES
           for name in _imports(path) if name.split(".")[0] == "argparse"]
    assert not bad, f"argparse imported in the library layers (parse flags in cli/ or tools/): {bad}"


def test_known_exceptions_still_exist():
    """An exception that no longer occurs must leave the list (so that the rule tightens by itself)."""
    present = {(path, name) for path, _ in _modules() for name in _imports(path)}
    assert KNOWN_EXCEPTIONS <= present, sorted(KNOWN_EXCEPTIONS - present)


_READ_LAUNCHERS = """
import glob, os
import tools.run_table
from tools.runtable.plan import plan_runs
found = [sorted(glob.glob(f"train_scripts/{p}"))[:2] for p in (
    "vit/vtab/*/train_dtl*.sh", "swin/vtab/*/train_dtl*.sh", "vit/few_shot/*/train_dtl*_shot_*.sh",
    "vit/domain_generalization/*/train_dtl*.sh", "custom/train_dtl*.sh")]
specs = plan_runs([os.path.abspath(p) for ps in found for p in ps], "/nonexistent", [], {},
                  check_paths=False, check_placeholders=False)
assert len(specs) == 10, [s.name for s in specs]
assert {s.name.split("/")[-1].split("_shot_")[0] for s in specs} == {"dtl", "dtl+"}, [s.name for s in specs]
"""


@pytest.mark.parametrize("code", [
    "import cli.flags; cli.flags.build_parser()",
    "import cli.flags; cli.flags.build_parser().parse_args(['--dataset', 'dtd', '--lr', '0.1'])",
    # validation and the run's method name read the light method registry
    "import cli.flags as f; a = f.parse_args(['--dataset', 'dtd', '--fusion_size', '3', '--cache_prefix']); "
    "assert f.resolved_method(a) == 'dtl+'",
    "import methods; assert methods.get_method('dtl+').supports('lean')",
    "import engine.tables",
    # run_table reads every launcher's flags with train.py's parser
    _READ_LAUNCHERS,
], ids=["parser", "parse", "validate", "methods", "tables", "run_table-launchers"])
def test_reading_flags_imports_no_torch(code):
    probe = code + "\nimport sys; print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
