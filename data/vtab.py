"""VTAB-1k: the 19 tasks, their folders, class counts and groups (SPEC §3.1), and the list-file datasets.

Layout: ``<data_dir>/<folder>/{train800,val200,train800val200,test}.txt`` with image paths relative to
``<data_dir>/<folder>/`` (the layout of the widely shared VTAB-1k extraction used by SSF, NOAH and DTL).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

from .errors import DataError, require_root

if TYPE_CHECKING:  # the torch Dataset is imported only when a dataset is built
    from .datasets import ListFileDataset

__all__ = [
    "VTABTask", "VTAB_TASKS", "VTAB_GROUPS", "VTAB_SPLITS", "VTAB_TRAIN_SPLIT", "VTAB_EVAL_SPLIT",
    "get_vtab_task", "vtab_list_path", "build_vtab_dataset",
]


@dataclass(frozen=True)
class VTABTask:
    """One VTAB-1k task: canonical ``name``, data ``folder``, ``num_classes`` and ``group``."""

    name: str
    folder: str
    num_classes: int
    group: str  # 'natural' | 'specialized' | 'structured'


_TASKS: List[VTABTask] = [
    # Natural
    VTABTask("cifar_100", "cifar", 100, "natural"),
    VTABTask("caltech101", "caltech101", 102, "natural"),
    VTABTask("dtd", "dtd", 47, "natural"),
    VTABTask("flowers102", "oxford_flowers102", 102, "natural"),
    VTABTask("pets", "oxford_iiit_pet", 37, "natural"),
    VTABTask("svhn", "svhn", 10, "natural"),
    VTABTask("sun397", "sun397", 397, "natural"),
    # Specialized
    VTABTask("patch_camelyon", "patch_camelyon", 2, "specialized"),
    VTABTask("eurosat", "eurosat", 10, "specialized"),
    VTABTask("resisc45", "resisc45", 45, "specialized"),
    VTABTask("diabetic_retinopathy", "diabetic_retinopathy", 5, "specialized"),
    # Structured
    VTABTask("clevr_count", "clevr_count", 8, "structured"),
    VTABTask("clevr_dist", "clevr_dist", 6, "structured"),
    VTABTask("dmlab", "dmlab", 6, "structured"),
    VTABTask("kitti", "kitti", 4, "structured"),
    VTABTask("dsprites_loc", "dsprites_loc", 16, "structured"),
    VTABTask("dsprites_ori", "dsprites_ori", 16, "structured"),
    VTABTask("smallnorb_azi", "smallnorb_azi", 18, "structured"),
    VTABTask("smallnorb_ele", "smallnorb_ele", 9, "structured"),
]

#: The 19 tasks in SPEC order (Natural, Specialized, Structured), keyed by canonical name.
VTAB_TASKS: Dict[str, VTABTask] = {t.name: t for t in _TASKS}

#: Group name -> task names, in SPEC order.
VTAB_GROUPS: Dict[str, Tuple[str, ...]] = {
    g: tuple(t.name for t in _TASKS if t.group == g) for g in ("natural", "specialized", "structured")
}

VTAB_SPLITS: Tuple[str, ...] = ("train800", "val200", "train800val200", "test")
VTAB_TRAIN_SPLIT = "train800val200"  # the original trains on all 1000 images ...
VTAB_EVAL_SPLIT = "test"  # ... and evaluates the test split once after the last epoch

# Extra spellings seen in launchers and other code bases (the data folder names are added below).
_EXTRA_ALIASES = {
    "cifar100": "cifar_100",
    "cifar-100": "cifar_100",
    "oxford_pet": "pets",
    "oxford_pets": "pets",
    "oxford_iiit_pets": "pets",
    "flowers": "flowers102",
    "oxford_flowers": "flowers102",
    "camelyon": "patch_camelyon",
    "retinopathy": "diabetic_retinopathy",
}


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


_ALIASES: Dict[str, str] = {}
for _t in _TASKS:
    _ALIASES[_norm(_t.name)] = _t.name
    _ALIASES[_norm(_t.folder)] = _t.name
for _a, _n in _EXTRA_ALIASES.items():
    _ALIASES[_norm(_a)] = _n
# A 'vtab-' / 'vtab_' prefix is accepted too (e.g. 'vtab-cifar_100').


def get_vtab_task(name: str) -> VTABTask:
    """The task called ``name`` (canonical name, data folder name, or a known alias; case and '-'/'_'
    insensitive). Unknown name -> ``ValueError`` listing the valid names."""
    key = _norm(name)
    if key.startswith("vtab_"):
        key = key[len("vtab_"):]
    if key in _ALIASES:
        return VTAB_TASKS[_ALIASES[key]]
    raise ValueError(f"unknown VTAB-1k task {name!r}; valid names: {', '.join(VTAB_TASKS)} "
                     f"(folder names {', '.join(t.folder for t in _TASKS if t.folder != t.name)} are accepted too)")


def vtab_list_path(data_dir: str, task, split: str) -> str:
    """``<data_dir>/<folder>/<split>.txt`` for a task name or :class:`VTABTask`."""
    t = task if isinstance(task, VTABTask) else get_vtab_task(task)
    if split not in VTAB_SPLITS:
        raise ValueError(f"unknown VTAB split {split!r}; valid: {', '.join(VTAB_SPLITS)}")
    return os.path.join(data_dir, t.folder, f"{split}.txt")


def build_vtab_dataset(
        data_dir: str,
        task,
        split: str,
        transform: Optional[Callable] = None,
        **kwargs,
) -> "ListFileDataset":
    """The list-file dataset of one VTAB-1k task and split.

    Args:
        data_dir: the VTAB-1k root (holding one folder per task, e.g. ``cifar/``).
        task: task name (or alias, or :class:`VTABTask`).
        split: ``train800``, ``val200``, ``train800val200`` or ``test``.
        transform: image transform.
        **kwargs: passed to :class:`ListFileDataset` (``skip_bad_images``, ``check_files``).
    """
    t = task if isinstance(task, VTABTask) else get_vtab_task(task)
    require_root(data_dir, "VTAB data root")
    folder = os.path.join(data_dir, t.folder)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: data folder of VTAB task {t.name!r} not found (expected <data_dir>/{t.folder}/)")
    list_path = vtab_list_path(data_dir, t, split)
    if not os.path.isfile(list_path):
        raise DataError(f"{list_path}: list file of VTAB task {t.name!r}, split {split!r} not found")
    from .datasets import ListFileDataset

    return ListFileDataset(folder, list_path, t.num_classes, transform=transform, **kwargs)
