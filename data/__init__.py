"""Data for the three DTL benchmarks and your own data: list-file datasets, transforms, synthetic roots, data checks.

Names are imported lazily (``from data import build_transform`` works), so tools that only need the light
modules (``data.check``, ``data.vtab`` tables) start without importing torch/timm.
"""
import importlib

_EXPORTS = {
    "DataError": "errors", "parse_list_file": "listfile", "ListFileDataset": "datasets",
    "BENCHMARKS": "benchmarks", "canonical_benchmark": "benchmarks", "get_benchmark": "benchmarks",
    "Benchmark": "benchmark",
    "VTABTask": "vtab", "VTAB_TASKS": "vtab", "VTAB_GROUPS": "vtab", "get_vtab_task": "vtab",
    "build_vtab_dataset": "vtab",
    "FGFS_DATASETS": "few_shot", "canonical_fgfs_name": "few_shot", "build_fgfs_dataset": "few_shot",
    "DG_TARGETS": "domain_generalization", "DG_NUM_CLASSES": "domain_generalization",
    "canonical_dg_target": "domain_generalization", "build_dg_source": "domain_generalization",
    "build_dg_target": "domain_generalization",
    "DTL_MEAN": "transforms", "DTL_STD": "transforms", "build_transform": "transforms",
    "normalize_uint8_batch": "transforms", "transform_is_deterministic": "transforms",
    "check_data_root": "check",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
