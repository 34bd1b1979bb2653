"""The registry of benchmarks: one :class:`~data.benchmark.Benchmark` per module, looked up by name or alias
(the paper's three, and ``folder``: your own data).

Adding a benchmark: write ``data/<name>.py`` with its datasets and a ``BENCHMARK = Benchmark(...)`` (see
:mod:`data.benchmark` for the fields), add it to ``_MODULES`` below, and test it (see the README).
"""
from __future__ import annotations

from typing import Dict, Tuple

from . import domain_generalization, few_shot, folder, vtab
from .benchmark import Benchmark
from .errors import UnknownNameError

__all__ = ["BENCHMARKS", "REGISTRY", "get_benchmark", "canonical_benchmark"]

_MODULES = (vtab, few_shot, domain_generalization, folder)

#: canonical name -> Benchmark, in table order.
REGISTRY: Dict[str, Benchmark] = {m.BENCHMARK.name: m.BENCHMARK for m in _MODULES}
BENCHMARKS: Tuple[str, ...] = tuple(REGISTRY)

_ALIASES: Dict[str, str] = {}
for _b in REGISTRY.values():
    for _a in (_b.name, *_b.aliases):
        _ALIASES[_a] = _b.name


def canonical_benchmark(name: str) -> str:
    """``vtab`` | ``few_shot`` | ``domain_generalization`` | ``folder`` (accepts e.g. ``few-shot``, ``fgfs``,
    ``dg``)."""
    key = name.strip().lower().replace("-", "_")
    if key not in _ALIASES:
        raise UnknownNameError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    return _ALIASES[key]


def get_benchmark(name: str) -> Benchmark:
    """The :class:`Benchmark` called ``name`` (or an alias); ``ValueError`` when unknown."""
    return REGISTRY[canonical_benchmark(name)]
