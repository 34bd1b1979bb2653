"""Domain generalisation (NOAH protocol; docs/method.md, section 3): train on 16-shot ImageNet, test on five targets.

Layout (CoOp image folders + NOAH annotations)::

    <data_dir>/imagenet/annotations/train_meta.list.num_shot_16.seed_<s>   source, paths relative to
                                                                        <data_dir>/imagenet/images/train/
    <data_dir>/imagenet/annotations/val_meta.list                       target 'imagenet', paths relative to
                                                                        <data_dir>/imagenet/images/val/
    <data_dir>/<target>/annotations/val_meta.list                       other targets, paths relative to
                                                                        <data_dir>/<target>/

Path base of the ``imagenet`` target: the original layout puts its images under ``imagenet/images/val/`` (the mirror of
the source under ``imagenet/images/train/``), so list paths are taken relative to that folder. A list whose
paths already start with ``images/val/`` (i.e. relative to ``<data_dir>/imagenet/``, like the other targets)
is recognised too: the base is chosen by looking up the first listed file under ``images/val/`` first and then
under ``imagenet/``; the choice is logged. Labels of every target (including -adversarial and -rendition) are
in the 1000-class ImageNet index space.
"""
from __future__ import annotations

import logging
import os
from fractions import Fraction
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

from .benchmark import Benchmark, DataPlan, DataRequest, SeedPlan, TableLayout
from .errors import DataError, UnknownNameError, require_root
from .listcheck import CheckReport, check_list, check_plan, first_path, select_names
from .listfile import parse_list_file

if TYPE_CHECKING:  # the torch Dataset is imported only when a dataset is built
    from .datasets import ListFileDataset

__all__ = [
    "DG_SOURCE", "DG_TARGETS", "DG_NUM_CLASSES", "DG_SEEDS", "DG_SHOT", "canonical_dg_target",
    "dg_source_list_path", "dg_source_image_root", "dg_target_list_path", "dg_target_image_roots",
    "resolve_dg_target_image_root", "build_dg_source", "build_dg_target", "dg_targets", "BENCHMARK",
]

_logger = logging.getLogger(__name__)

DG_SOURCE = "imagenet"
DG_TARGETS: Tuple[str, ...] = ("imagenet", "imagenetv2", "imagenet-sketch", "imagenet-adversarial",
                               "imagenet-rendition")
DG_NUM_CLASSES = 1000
DG_SEEDS: Tuple[int, ...] = (0, 1, 2)
DG_SHOT = 16

_ALIASES = {
    "imagenet-v2": "imagenetv2", "imagenet_v2": "imagenetv2",
    "imagenet-a": "imagenet-adversarial", "imagenet-r": "imagenet-rendition",
    "imagenet-s": "imagenet-sketch",
}


def canonical_dg_target(name: str) -> str:
    """Folder name of a DG target (accepts ``imagenet-a``, ``imagenet-r``, ``imagenet-v2``, '_' for '-')."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DG_TARGETS:
        raise UnknownNameError(f"unknown domain-generalisation target {name!r}; valid: {', '.join(DG_TARGETS)}")
    return key


def dg_source_list_path(data_dir: str, seed: int, shot: int = DG_SHOT) -> str:
    return os.path.join(data_dir, DG_SOURCE, "annotations", f"train_meta.list.num_shot_{int(shot)}.seed_{int(seed)}")


def dg_source_image_root(data_dir: str) -> str:
    return os.path.join(data_dir, DG_SOURCE, "images", "train")


def dg_target_list_path(data_dir: str, target: str) -> str:
    return os.path.join(data_dir, canonical_dg_target(target), "annotations", "val_meta.list")


def dg_target_image_roots(data_dir: str, target: str) -> List[str]:
    """Candidate folders the target's list paths are relative to, in order of preference."""
    t = canonical_dg_target(target)
    if t == "imagenet":
        return [os.path.join(data_dir, t, "images", "val"), os.path.join(data_dir, t)]
    return [os.path.join(data_dir, t)]


def resolve_dg_target_image_root(data_dir: str, target: str, first_path: Optional[str] = None) -> str:
    """The folder a target's list paths are relative to (see the module docstring for ``imagenet``).

    ``first_path``: the first path of the list; when given, the first candidate holding it wins.
    """
    candidates = dg_target_image_roots(data_dir, target)
    if first_path is not None and len(candidates) > 1:
        for c in candidates:
            if os.path.isfile(os.path.join(c, first_path)):
                if c != candidates[0]:
                    _logger.info("%s: list paths are relative to %s", dg_target_list_path(data_dir, target), c)
                return c
    return candidates[0]


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"{path}: {what} not found")


def build_dg_source(
        data_dir: str,
        seed: int,
        shot: int = DG_SHOT,
        transform: Optional[Callable] = None,
        **kwargs,
) -> "ListFileDataset":
    """The ImageNet ``shot``-shot training list of ``seed`` (1000 classes).

    ``**kwargs`` go to :class:`ListFileDataset` (``skip_bad_images``, ``check_files``).
    """
    require_root(data_dir, "domain-generalisation data root")
    _require_dir(os.path.join(data_dir, DG_SOURCE), "ImageNet source folder")
    list_path = dg_source_list_path(data_dir, seed, shot)
    if not os.path.isfile(list_path):
        raise DataError(f"{list_path}: ImageNet {shot}-shot source list for seed {seed} not found")
    image_root = dg_source_image_root(data_dir)
    _require_dir(image_root, "ImageNet training image folder (imagenet/images/train, see the README's DG data "
                             "preparation: it is not in DG.zip, link your ImageNet train folder there)")
    from .datasets import ListFileDataset

    return ListFileDataset(image_root, list_path, DG_NUM_CLASSES, transform=transform, **kwargs)


def build_dg_target(
        data_dir: str,
        target: str,
        transform: Optional[Callable] = None,
        **kwargs,
) -> "ListFileDataset":
    """The evaluation list of a DG target (``annotations/val_meta.list``, 1000-class labels).

    ``**kwargs`` go to :class:`ListFileDataset` (``skip_bad_images``, ``check_files``).
    """
    t = canonical_dg_target(target)
    require_root(data_dir, "domain-generalisation data root")
    _require_dir(os.path.join(data_dir, t), f"folder of DG target {t!r}")
    list_path = dg_target_list_path(data_dir, t)
    if not os.path.isfile(list_path):
        raise DataError(f"{list_path}: evaluation list of DG target {t!r} not found")
    first = None
    if len(dg_target_image_roots(data_dir, t)) > 1:
        entries = parse_list_file(list_path, DG_NUM_CLASSES)
        first = entries[0][0] if entries else None
    image_root = resolve_dg_target_image_root(data_dir, t, first)
    from .datasets import ListFileDataset

    return ListFileDataset(image_root, list_path, DG_NUM_CLASSES, transform=transform, **kwargs)


def dg_targets(spec: str) -> List[str]:
    """The targets of ``--target_dataset`` (a name, a comma list, ``all``: the five targets)."""
    if spec.strip().lower() == "all":
        return list(DG_TARGETS)
    return [canonical_dg_target(t) for t in spec.split(",") if t.strip()]


def build_dg_plan(req: DataRequest) -> DataPlan:
    """Seed ``s`` trains on the ImageNet ``shot``-shot list of seed ``s``; every target is evaluated after the
    last epoch (``--target_dataset``, default ``--dataset``)."""
    kw = req.dataset_kwargs
    targets = dg_targets(req.target or req.dataset)
    tests = {t: build_dg_target(req.data_dir, t, transform=req.test_transform, **kw) for t in targets}
    seeds = []
    for i, s in enumerate(req.seeds):
        train = (build_dg_source(req.data_dir, s, shot=req.shot, transform=req.train_transform, **kw)
                 if req.need_train else None)
        seeds.append(SeedPlan(i, s, train, None, tests))
    info = {"source": f"{DG_SOURCE}-{req.shot}shot", "target": targets[0] if len(targets) == 1 else targets,
            "shot": req.shot}
    plan = DataPlan(DG_NUM_CLASSES, seeds, req.dataset, info)
    check_plan(plan, req.allow_overlap)
    return plan


def _primary_target(dataset: str, names) -> str:
    """``--dataset``'s target when it was evaluated, else the first evaluated target."""
    try:
        name = canonical_dg_target(dataset)
    except ValueError:
        name = None
    return name if name in names else next(iter(names))


def check_dg_root(root: str, targets, report: CheckReport, seeds=DG_SEEDS, shot=DG_SHOT) -> None:
    src = os.path.join(root, DG_SOURCE)
    if not os.path.isdir(os.path.join(src, "annotations")):
        report.errors.append(f"{os.path.join(src, 'annotations')}: ImageNet source annotations not found")
    else:
        train_root = dg_source_image_root(root)
        for s in seeds:
            report.lists.append(check_list(f"{DG_SOURCE} (source)", f"train {shot}-shot seed {s}", train_root,
                                           dg_source_list_path(root, s, shot), DG_NUM_CLASSES,
                                           expected_per_class=shot))
    names = select_names(targets, list(DG_TARGETS),
                    lambda n: os.path.isfile(dg_target_list_path(root, n)), canonical_dg_target,
                    "DG targets", report)
    for t in names:
        lp = dg_target_list_path(root, t)
        image_root = resolve_dg_target_image_root(root, t, first_path(lp) if os.path.isfile(lp) else None)
        report.lists.append(check_list(f"{t} (target)", "val", image_root, lp, DG_NUM_CLASSES, role="test"))


def looks_like_dg_root(root: str) -> bool:
    return any(os.path.isdir(os.path.join(root, t, "annotations")) for t in DG_TARGETS)


BENCHMARK = Benchmark(
    name="domain_generalization", title="domain generalisation", aliases=("domain_generalisation", "dg"),
    table="dg", launcher_data_dir="/path/to/DG", default_seeds=DG_SEEDS,
    shot="optional", default_shot=DG_SHOT, shot_help="shots of the ImageNet source",
    augment_train=True, eval_resize=Fraction(256, 224), selects_on_val=False, targets=True, shot_in_names=False,
    canonical_dataset=canonical_dg_target, dataset_names=DG_TARGETS, num_classes=lambda name: DG_NUM_CLASSES,
    build=build_dg_plan, primary=_primary_target, check_root=check_dg_root, detect=looks_like_dg_root,
    protocol=("seeds 0,1,2 in turn, trained on ImageNet 16-shot, evaluated on the target after the last\n"
              "epoch (add --target_dataset all to evaluate all five targets with the same models)."),
    table_layout=TableLayout(
        title="Domain generalisation (top-1 %)", columns="datasets", item="targets", mean_excludes=("imagenet",),
        labels=(("imagenet", "ImageNet (source)"), ("imagenetv2", "-V2"), ("imagenet-sketch", "-Sketch"),
                ("imagenet-adversarial", "-A"), ("imagenet-rendition", "-R")),
        note="Source: ImageNet 16-shot. Cells: top-1 % (1000-way), mean ± sample std over seeds.",
        partial_note="mean over the targets present only."),
)
