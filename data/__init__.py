"""Data for the three DTL benchmarks: list-file datasets, transforms, synthetic roots, data checks."""
from .datasets import DataError, ListFileDataset, parse_list_file
from .domain_generalization import DG_NUM_CLASSES, DG_TARGETS, build_dg_source, build_dg_target
from .few_shot import FGFS_DATASETS, build_fgfs_dataset, canonical_fgfs_name
from .transforms import (
    DTL_MEAN, DTL_STD, build_transform, canonical_benchmark, normalize_uint8_batch, transform_is_deterministic,
)
from .vtab import VTAB_GROUPS, VTAB_TASKS, VTABTask, build_vtab_dataset, get_vtab_task

__all__ = [
    "DataError", "ListFileDataset", "parse_list_file", "DG_NUM_CLASSES", "DG_TARGETS", "build_dg_source",
    "build_dg_target", "FGFS_DATASETS", "build_fgfs_dataset", "canonical_fgfs_name", "DTL_MEAN", "DTL_STD",
    "build_transform", "canonical_benchmark", "normalize_uint8_batch", "transform_is_deterministic",
    "VTAB_GROUPS", "VTAB_TASKS", "VTABTask", "build_vtab_dataset", "get_vtab_task",
]
