"""The suite's tiers (tests/conftest.py): every test module has one, the slow list names tests that exist, an
untiered module cannot be collected, ``--quick`` drops exactly the slow tests, and what ``--quick`` keeps still
imports every project module (methods/, models/, data/, engine/, cli/, utils/, train.py)."""
from __future__ import annotations

import ast
import configparser
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, Set

import conftest
from conftest import REPO, SLOW, TESTS, TIER_MARKERS, TIERS

# What --quick must import: every module of these packages, and these scripts.
PROJECT_PACKAGES = ("methods", "models", "data", "engine", "cli", "utils")
PROJECT_SCRIPTS = ("train.py",)
PROJECT_MODULES = sorted([p for pkg in PROJECT_PACKAGES for p in (REPO / pkg).rglob("*.py")]
                         + [REPO / s for s in PROJECT_SCRIPTS])


def _test_modules() -> Set[str]:
    return {conftest.module_key(p) for p in TESTS.rglob("test_*.py")}


def _test_functions(key: str) -> Set[str]:
    tree = ast.parse((TESTS / key).read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def _imported_names(path: Path, package: str) -> Set[str]:
    """Every module name ``path`` imports, anywhere in the file (``from a import b`` gives ``a`` and ``a.b``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _resolve(name: str, importer: Path) -> Iterable[Path]:
    """The files of this repository that importing ``name`` from ``importer`` runs (packages' __init__ too)."""
    roots = (importer.parent, TESTS, REPO, REPO / "tools")  # sys.path of the tests: pytest.ini, the tests' inserts
    parts = name.split(".")
    for root in roots:
        if (root / f"{parts[0]}.py").is_file() or (root / parts[0] / "__init__.py").is_file():
            break
    else:
        return []  # not ours (torch, timm, ...)
    found = []
    for i in range(1, len(parts) + 1):
        stem = root.joinpath(*parts[:i])
        for candidate in (stem / "__init__.py", stem.with_suffix(".py")):
            if candidate.is_file():
                found.append(candidate)
    return found


def _package_of(path: Path) -> str:
    return ".".join(path.relative_to(REPO).parts[:-1])


def _reachable(starts: Iterable[Path]) -> Dict[Path, Path]:
    """Every repository file reached from ``starts`` through imports -> the test module it was first reached from."""
    seen: Dict[Path, Path] = {}
    stack = [(p, p) for p in starts]
    while stack:
        path, origin = stack.pop()
        if path in seen:
            continue
        seen[path] = origin
        for name in _imported_names(path, _package_of(path)):
            stack.extend((p, origin) for p in _resolve(name, path) if p not in seen)
    return seen


def test_every_test_module_has_exactly_one_known_tier():
    assert set(TIERS) == _test_modules(), "TIERS in tests/conftest.py must list every test module, and only those"
    assert set(TIERS.values()) <= set(TIER_MARKERS)


def test_slow_entries_name_existing_modules_and_tests():
    for entry in SLOW:
        key, _, name = entry.partition("::")
        assert key in TIERS, entry
        if name:
            assert name in _test_functions(key), f"SLOW names {entry}, which is not a test of {key}"


def test_markers_are_registered_and_strict():
    ini = configparser.ConfigParser()
    ini.read(REPO / "pytest.ini")
    registered = {line.split(":")[0].strip() for line in ini["pytest"]["markers"].strip().splitlines()}
    assert registered == {*TIER_MARKERS, "slow"}
    assert "--strict-markers" in ini["pytest"]["addopts"].split()


def _quick_modules() -> Set[str]:
    """The test modules that keep at least one test under ``--quick``."""
    return {key for key in TIERS if any(not conftest.is_slow(key, name) for name in _test_functions(key))}


def test_quick_selection_imports_every_project_module():
    starts = [TESTS / key for key in sorted(_quick_modules())] + [TESTS / "conftest.py",
                                                                  TESTS / "timm_models" / "conftest.py"]
    reached = _reachable(starts)
    missing = [str(p.relative_to(REPO)) for p in PROJECT_MODULES if p not in reached]
    assert not missing, (f"no quick test module imports {missing}: give each a test that is not in SLOW "
                         f"(tests/conftest.py), so that `bash run_tests.sh --quick` exercises it")


def _mini_suite(tmp_path: Path, files: Dict[str, str]) -> Path:
    """A copy of the suite's configuration (pytest.ini, tests/conftest.py) around the given test files."""
    (tmp_path / "tests").mkdir()
    shutil.copy(REPO / "pytest.ini", tmp_path / "pytest.ini")
    shutil.copy(TESTS / "conftest.py", tmp_path / "tests" / "conftest.py")
    for name, body in files.items():
        (tmp_path / "tests" / name).write_text(body)
    return tmp_path


def _pytest(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=root,
                          capture_output=True, text=True, timeout=120)


def test_untiered_module_is_a_collection_error_and_quick_drops_the_slow_tests(tmp_path):
    swin = "def test_check_reference_cli_passes_on_swin():\n    pass\n\n\ndef test_fast():\n    pass\n"
    root = _mini_suite(tmp_path, {"test_swin.py": swin, "test_launchers.py": "def test_a():\n    pass\n",
                                  "test_new_feature.py": "def test_it():\n    pass\n"})
    proc = _pytest(root, "--collect-only", "--continue-on-collection-errors", "--quick", "-m", "unit")
    assert proc.returncode != 0
    assert "ERROR collecting tests/test_new_feature.py" in proc.stdout
    assert "test_new_feature.py has no tier: add it to TIERS in tests/conftest.py" in proc.stdout
    # test_launchers.py is e2e, the first test of test_swin.py is slow
    assert [line for line in proc.stdout.splitlines() if "::" in line] == ["tests/test_swin.py::test_fast"]
