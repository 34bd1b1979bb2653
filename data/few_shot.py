"""Few-shot fine-grained classification (FGFS, NOAH protocol; docs/method.md, section 3).

Layout::

    <data_dir>/few-shot_split/<dataset>/annotations/train_meta.list.num_shot_<k>.seed_<s>
    <data_dir>/few-shot_split/<dataset>/annotations/val_meta.list
    <data_dir>/few-shot_split/<dataset>/annotations/test_meta.list
    <data_dir>/<dataset>/...images...          (list paths are relative to <data_dir>/<dataset>/)

Dataset names are those of the original launchers; the ``-FS`` suffix they carry (``food101-FS``) is accepted.
"""
from __future__ import annotations

import os
from fractions import Fraction
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

from .benchmark import Benchmark, DataPlan, DataRequest, SeedPlan, TableLayout
from .errors import DataError, UnknownNameError, require_root
from .listcheck import CheckReport, check_list, check_plan, select_names

if TYPE_CHECKING:  # the torch Dataset is imported only when a dataset is built
    from .datasets import ListFileDataset

__all__ = [
    "FGFS_DATASETS", "FGFS_SHOTS", "FGFS_SEEDS", "FGFS_SPLITS", "canonical_fgfs_name",
    "fgfs_list_path", "fgfs_image_root", "build_fgfs_dataset", "BENCHMARK",
]

#: Dataset name (folder name) -> number of classes.
FGFS_DATASETS: Dict[str, int] = {
    "fgvc-aircraft": 100,
    "food101": 101,
    "oxford-flowers102": 102,
    "oxford-pets": 37,
    "standford-cars": 196,  # sic: the original folder/launcher spelling
}
FGFS_SHOTS: Tuple[int, ...] = (1, 2, 4, 8, 16)
FGFS_SEEDS: Tuple[int, ...] = (0, 1, 2)
FGFS_SPLITS: Tuple[str, ...] = ("train", "val", "test")
SPLIT_DIR = "few-shot_split"

_ALIASES = {"stanford-cars": "standford-cars", "oxford-flowers": "oxford-flowers102", "aircraft": "fgvc-aircraft"}


def canonical_fgfs_name(name: str) -> str:
    """Folder name of an FGFS dataset (accepts the launchers' ``-FS`` suffix, any case, '_' for '-')."""
    key = name.strip().lower().replace("_", "-")
    if key.endswith("-fs"):
        key = key[:-3]
    key = _ALIASES.get(key, key)
    if key not in FGFS_DATASETS:
        raise UnknownNameError(f"unknown few-shot dataset {name!r}; valid: {', '.join(FGFS_DATASETS)} "
                         f"(the launchers' '-FS' suffix is accepted, e.g. 'food101-FS')")
    return key


def fgfs_list_path(data_dir: str, dataset: str, split: str, shot: Optional[int] = None,
                   seed: Optional[int] = None) -> str:
    """Path of the list file of ``split`` (``train`` needs ``shot`` and ``seed``)."""
    ds = canonical_fgfs_name(dataset)
    ann = os.path.join(data_dir, SPLIT_DIR, ds, "annotations")
    if split == "train":
        if shot is None or seed is None:
            raise ValueError("few-shot split 'train' needs shot and seed (e.g. shot=16, seed=0)")
        return os.path.join(ann, f"train_meta.list.num_shot_{int(shot)}.seed_{int(seed)}")
    if split in ("val", "test"):
        return os.path.join(ann, f"{split}_meta.list")
    raise ValueError(f"unknown few-shot split {split!r}; valid: {', '.join(FGFS_SPLITS)}")


def fgfs_image_root(data_dir: str, dataset: str) -> str:
    return os.path.join(data_dir, canonical_fgfs_name(dataset))


def build_fgfs_dataset(
        data_dir: str,
        dataset: str,
        split: str,
        shot: Optional[int] = None,
        seed: Optional[int] = None,
        transform: Optional[Callable] = None,
        **kwargs,
) -> "ListFileDataset":
    """The list-file dataset of an FGFS dataset and split.

    Args:
        data_dir: the FGFS root (holding ``few-shot_split/`` and one image folder per dataset).
        dataset: dataset name (``food101`` or ``food101-FS``, ...).
        split: ``train`` (the ``shot``-shot list of ``seed``), ``val`` or ``test``.
        shot, seed: select the training list.
        transform: image transform.
        **kwargs: passed to :class:`ListFileDataset` (``skip_bad_images``, ``check_files``).
    """
    ds = canonical_fgfs_name(dataset)
    require_root(data_dir, "few-shot data root")
    split_root = os.path.join(data_dir, SPLIT_DIR)
    if not os.path.isdir(split_root):
        raise DataError(f"{split_root}: few-shot split folder not found (copy NOAH's data/few-shot there, "
                        f"see the README's data preparation)")
    list_path = fgfs_list_path(data_dir, ds, split, shot, seed)
    if not os.path.isfile(list_path):
        raise DataError(f"{list_path}: list file of few-shot dataset {ds!r}, split {split!r}"
                        + (f" (shot {shot}, seed {seed})" if split == "train" else "") + " not found")
    image_root = fgfs_image_root(data_dir, ds)
    if not os.path.isdir(image_root):
        raise DataError(f"{image_root}: image folder of few-shot dataset {ds!r} not found")
    from .datasets import ListFileDataset

    return ListFileDataset(image_root, list_path, FGFS_DATASETS[ds], transform=transform, **kwargs)


def build_fgfs_plan(req: DataRequest) -> DataPlan:
    """Seed ``s`` trains a fresh model on the ``shot``-shot list of seed ``s``, selects on ``val`` and tests on
    ``test``."""
    name = canonical_fgfs_name(req.dataset)
    kw = req.dataset_kwargs
    test = build_fgfs_dataset(req.data_dir, name, "test", transform=req.test_transform, **kw)
    val = build_fgfs_dataset(req.data_dir, name, "val", transform=req.test_transform, **kw) if req.need_train else None
    seeds = []
    for i, s in enumerate(req.seeds):
        train = (build_fgfs_dataset(req.data_dir, name, "train", shot=req.shot, seed=s, transform=req.train_transform,
                                    **kw) if req.need_train else None)
        seeds.append(SeedPlan(i, s, train, val, {"test": test}))
    plan = DataPlan(FGFS_DATASETS[name], seeds, req.dataset, {"shot": req.shot})
    check_plan(plan, req.allow_overlap)
    return plan


def check_fgfs_root(root: str, datasets, report: CheckReport, shots=FGFS_SHOTS, seeds=FGFS_SEEDS) -> None:
    split_root = os.path.join(root, SPLIT_DIR)
    if not os.path.isdir(split_root):
        report.errors.append(f"{split_root}: few-shot split folder not found")
        return
    names = select_names(datasets, list(FGFS_DATASETS),
                    lambda n: os.path.isdir(os.path.join(split_root, n)) or os.path.isdir(os.path.join(root, n)),
                    canonical_fgfs_name, "few-shot datasets", report)
    for ds in names:
        C = FGFS_DATASETS[ds]
        image_root = os.path.join(root, ds)
        if not os.path.isdir(image_root):
            report.errors.append(f"{image_root}: image folder of few-shot dataset {ds!r} not found")
            continue
        for k in shots:
            for s in seeds:
                report.lists.append(check_list(ds, f"train {k}-shot seed {s}", image_root,
                                               fgfs_list_path(root, ds, "train", k, s), C, expected_per_class=k))
        for split in ("val", "test"):
            report.lists.append(check_list(ds, split, image_root, fgfs_list_path(root, ds, split), C))


def looks_like_fgfs_root(root: str) -> bool:
    return os.path.isdir(os.path.join(root, SPLIT_DIR))


BENCHMARK = Benchmark(
    name="few_shot", title="few-shot FGFS", aliases=("fewshot", "fgfs", "fs"), table="few_shot",
    launcher_data_dir="/path/to/FGFS", default_seeds=FGFS_SEEDS,
    shot="required", shot_help="1, 2, 4, 8 or 16",
    augment_train=True, eval_resize=Fraction(256, 224), selects_on_val=True, default_eval_interval=10, targets=False,
    shot_in_names=True, canonical_dataset=canonical_fgfs_name, dataset_names=tuple(FGFS_DATASETS),
    num_classes=lambda name: FGFS_DATASETS[canonical_fgfs_name(name)], build=build_fgfs_plan,
    check_root=check_fgfs_root, detect=looks_like_fgfs_root,
    protocol="seeds 0,1,2 in turn (fresh model each), validation every 10 epochs, best weights tested.",
    table_layout=TableLayout(
        title="Few-shot fine-grained (top-1 %)", columns="shots", shots=FGFS_SHOTS,
        note="Cells: top-1 % on test_meta.list with the best-validation weights, mean ± sample std over seeds.",
        partial_note="average over the datasets present only (of {n})."),
)
