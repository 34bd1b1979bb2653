"""VTAB-1k: the 19 tasks, their folders, class counts and groups (docs/method.md, section 3), and the list-file datasets.

Layout: ``<data_dir>/<folder>/{train800,val200,train800val200,test}.txt`` with image paths relative to
``<data_dir>/<folder>/`` (the layout of the widely shared VTAB-1k extraction used by SSF, NOAH and DTL).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

from .benchmark import Benchmark, DataPlan, DataRequest, SeedPlan, TableLayout
from .errors import DataError, UnknownNameError, require_root
from .listcheck import CheckReport, check_list, check_plan, select_names

if TYPE_CHECKING:  # the torch Dataset is imported only when a dataset is built
    from .datasets import ListFileDataset

__all__ = [
    "VTABTask", "VTAB_TASKS", "VTAB_GROUPS", "VTAB_SPLITS", "VTAB_TRAIN_SPLIT", "VTAB_EVAL_SPLIT",
    "get_vtab_task", "vtab_list_path", "build_vtab_dataset", "BENCHMARK",
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

#: The 19 tasks in the benchmark's order (Natural, Specialized, Structured), keyed by canonical name.
VTAB_TASKS: Dict[str, VTABTask] = {t.name: t for t in _TASKS}

#: Group name -> task names, in the benchmark's order.
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
    raise UnknownNameError(f"unknown VTAB-1k task {name!r}; valid names: {', '.join(VTAB_TASKS)} "
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


def build_vtab_plan(req: DataRequest) -> DataPlan:
    """Every seed trains on ``train800val200`` and is tested once on ``test`` (no model selection)."""
    task = get_vtab_task(req.dataset)
    kw = req.dataset_kwargs
    test = build_vtab_dataset(req.data_dir, task, VTAB_EVAL_SPLIT, transform=req.test_transform, **kw)
    train = (build_vtab_dataset(req.data_dir, task, VTAB_TRAIN_SPLIT, transform=req.train_transform, **kw)
             if req.need_train else None)
    seeds = [SeedPlan(i, s, train, None, {"test": test}) for i, s in enumerate(req.seeds)]
    plan = DataPlan(task.num_classes, seeds, task.name)
    check_plan(plan, req.allow_overlap)
    return plan


def check_vtab_root(root: str, tasks, report: CheckReport) -> None:
    names = select_names(tasks, list(VTAB_TASKS), lambda n: os.path.isdir(os.path.join(root, VTAB_TASKS[n].folder)),
                    lambda n: get_vtab_task(n).name, "VTAB tasks", report)
    for name in names:
        t = VTAB_TASKS[name]
        folder = os.path.join(root, t.folder)
        if not os.path.isdir(folder):
            report.errors.append(f"{folder}: data folder of VTAB task {name!r} not found")
            continue
        reps = {}
        for split in VTAB_SPLITS:
            reps[split] = check_list(name, split, folder, os.path.join(folder, f"{split}.txt"), t.num_classes)
            report.lists.append(reps[split])
        tr, va, tv = reps["train800"], reps["val200"], reps["train800val200"]
        if tr.ok and va.ok and tv.ok and tv.n_samples != tr.n_samples + va.n_samples:
            tv.warnings.append(f"{tv.list_path}: {tv.n_samples} images, but train800 + val200 hold "
                               f"{tr.n_samples} + {va.n_samples}")


def looks_like_vtab_root(root: str) -> bool:
    """A folder holding at least one task folder with a split list."""
    return any(os.path.isfile(os.path.join(root, t.folder, f"{s}.txt")) for t in VTAB_TASKS.values()
               for s in VTAB_SPLITS)


BENCHMARK = Benchmark(
    name="vtab", title="VTAB-1k", aliases=("vtab1k", "vtab_1k"), table="vtab",
    launcher_data_dir="/path/to/VTAB/vtab-1k", default_seeds=(0,),
    shot="none", shot_help="it always trains on train800val200",
    augment_train=False, eval_resize=1, selects_on_val=False, targets=False, shot_in_names=False,
    canonical_dataset=lambda name: get_vtab_task(name).name, dataset_names=tuple(VTAB_TASKS),
    num_classes=lambda name: get_vtab_task(name).num_classes, build=build_vtab_plan,
    check_root=check_vtab_root, detect=looks_like_vtab_root,
    protocol="train on train800val200, evaluate test once after the last epoch (no selection).",
    table_layout=TableLayout(
        columns="datasets", item="tasks",
        groups=tuple((g, g.capitalize(), tuple(tasks)) for g, tasks in VTAB_GROUPS.items()),
        note=("Cells: top-1 % on the test split (mean ± sample std over seeds when several). "
              "**Mean (groups)** = mean of the three group means (the paper's VTAB number); "
              "**Mean (19 tasks)** = plain mean over the 19 tasks."),
        partial_note="mean over the tasks present only (not comparable with published means); – = no result.",
        paper="tools.paper_numbers:vtab", paper_backbone="vit_base_patch16_224_in21k",
        paper_note=("per-task DTL numbers from the DTL paper; means of the group means of DTL, DTL+ and the "
                    "baselines as listed (with sources) in tools/plot_memory.py.")),
)
