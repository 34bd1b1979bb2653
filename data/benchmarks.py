"""Benchmark names (kept free of heavy imports)."""
from typing import Tuple

__all__ = ["BENCHMARKS", "canonical_benchmark"]

BENCHMARKS: Tuple[str, ...] = ("vtab", "few_shot", "domain_generalization")
_BENCHMARK_ALIASES = {
    "vtab": "vtab", "vtab1k": "vtab", "vtab_1k": "vtab",
    "few_shot": "few_shot", "fewshot": "few_shot", "fgfs": "few_shot", "fs": "few_shot",
    "domain_generalization": "domain_generalization", "domain_generalisation": "domain_generalization",
    "dg": "domain_generalization",
}


def canonical_benchmark(name: str) -> str:
    """``vtab`` | ``few_shot`` | ``domain_generalization`` (accepts e.g. ``few-shot``, ``fgfs``, ``dg``)."""
    key = name.strip().lower().replace("-", "_")
    if key not in _BENCHMARK_ALIASES:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    return _BENCHMARK_ALIASES[key]
