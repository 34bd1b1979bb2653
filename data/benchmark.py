"""What a benchmark is, for the rest of the program: :class:`Benchmark`, and the per-seed data it plans.

Each benchmark module (``data/vtab.py``, ``data/few_shot.py``, ``data/domain_generalization.py``, and
``data/folder.py`` for your own data) defines one ``BENCHMARK = Benchmark(...)``; :mod:`data.benchmarks` lists them. Everything that depends on the benchmark
(flag validation, transforms, the data of every seed, model selection, the primary metric, run-folder and
launcher names, result tables) reads these fields instead of comparing benchmark names.

This module imports only :mod:`utils.errors` (a leaf), so every other module may import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from utils.errors import UsageError

__all__ = ["Benchmark", "TableLayout", "SeedPlan", "DataPlan", "DataRequest", "check_num_classes"]


@dataclass
class SeedPlan:
    """What one seed trains on and evaluates: ``train`` (None for --eval_only), ``val`` (few-shot selection),
    ``tests`` (name -> dataset: ``test`` for VTAB/few-shot, one entry per DG target)."""

    index: int
    data_seed: int
    train: Any
    val: Any
    tests: Dict[str, Any]


@dataclass
class DataPlan:
    """The datasets of a whole run: ``num_classes``, one :class:`SeedPlan` per seed, the canonical ``dataset``
    name results.json records, ``info`` (source/target/shot entries of results.json), and ``class_names``
    (label ``i`` is ``class_names[i]``; ``None`` where the data does not name its classes)."""

    num_classes: int
    seeds: List[SeedPlan]
    dataset: str
    info: Dict[str, Any] = field(default_factory=dict)
    class_names: Optional[List[str]] = None


def check_num_classes(plan: DataPlan, given: Optional[int]) -> None:
    """:class:`UsageError` naming ``--num_classes`` when ``given`` (``None``: not given) differs from the class
    count the data holds."""
    if given is not None and given != plan.num_classes:
        raise UsageError(f"--num_classes {given}: the data of {plan.dataset!r} has {plan.num_classes} classes")


@dataclass
class DataRequest:
    """What a benchmark needs to build the data of a run (from the resolved flags)."""

    data_dir: str
    dataset: str
    seeds: Sequence[int]
    shot: Optional[int]
    target: Optional[str]  # --target_dataset (benchmarks with ``targets``)
    train_transform: Callable
    test_transform: Callable
    need_train: bool  # False for --eval_only
    dataset_kwargs: Dict[str, Any] = field(default_factory=dict)  # for ListFileDataset (skip_bad_images)
    allow_overlap: bool = False  # an image in a training and a test list is refused unless this is set


@dataclass(frozen=True)
class TableLayout:
    """How ``tools/aggregate.py`` lays out a benchmark's results table (every field has a default: a benchmark
    without a layout gets one row per backbone + dataset and one column per method).

    Attributes:
        title: the table's title (default: the benchmark's ``title`` + `` (top-1 %)``).
        columns: ``"methods"`` (rows: backbone + dataset, columns: methods), ``"datasets"`` (rows: backbone +
            method, columns: the datasets in the benchmark's order, then their mean) or ``"shots"`` (rows:
            backbone + method + dataset, an average row per backbone + method, columns: shots).
        groups: ``"datasets"`` only: ``(key, label, datasets)`` groups; each group is followed by its mean, the
            table gets the mean of the group means, a count column and a summary table.
        labels: ``"datasets"`` only: ``(dataset, column label)`` for columns not headed by the dataset's name.
        mean_excludes: ``"datasets"`` only: datasets left out of the plain mean (e.g. a source domain).
        item: what a dataset is called in the mean's label (``Mean (19 tasks)``).
        shots: ``"shots"`` only: shot columns shown even when no result has them.
        note: the first footnote (what a cell is).
        partial_note: the footnote of partial means, after ``† partial: `` (``{n}``: the number of datasets).
        paper: ``"module:function"`` returning ``{(method, column): (published top-1, source)}``, imported only
            for ``--paper``; empty: no published numbers.
        paper_backbone: the backbone the published numbers are for.
        paper_note: the footnote of the published numbers.
    """

    title: str = ""
    columns: str = "methods"
    groups: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = ()
    labels: Tuple[Tuple[str, str], ...] = ()
    mean_excludes: Tuple[str, ...] = ()
    item: str = "datasets"
    shots: Tuple[int, ...] = ()
    note: str = "Cells: top-1 % on the test split (mean ± sample std over seeds when several)."
    partial_note: str = "mean over the datasets present only."
    paper: str = ""
    paper_backbone: str = ""
    paper_note: str = ""


def _test_split(dataset: str, names: Sequence[str]) -> str:
    return "test"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark, described once.

    Attributes:
        name: canonical name (``--benchmark``, results.json, folder names).
        title: human name (logs, launcher comments).
        aliases: other accepted spellings of ``name`` (lower case, ``_`` for ``-``).
        table: short name of its result table (``tools/aggregate.py`` files ``<base>_<table>.csv``).
        launcher_data_dir: placeholder of ``DATA_DIR`` in the generated launchers.
        default_seeds: data seeds run when ``--seeds`` is not given.
        shot: ``"none"`` (``--shot`` is an error), ``"required"`` or ``"optional"`` (then ``default_shot``).
        default_shot: ``--shot`` when omitted (``shot == "optional"``).
        shot_help: the reason in the ``--shot`` error message (what the benchmark trains on / which shots).
        augment_train: the training transform is random (RandomResizedCrop + flip + RandAugment); else train and
            test use the same deterministic resize (a prefix cache is exact only then).
        eval_resize: evaluation resize factor before the centre crop (1 = resize to the input size).
        selects_on_val: validate every ``--eval_interval`` epochs and test the best validation weights.
        default_eval_interval: ``--eval_interval`` when omitted (``selects_on_val`` only).
        targets: evaluates one or several named targets (``--target_dataset``), not a single ``test`` split.
        shot_in_names: run folders and launchers carry ``_shot_<k>``.
        canonical_dataset: dataset name -> canonical name; ``ValueError`` listing the valid names.
        dataset_names: every canonical dataset name, in table order.
        num_classes: canonical dataset name -> number of classes of the head (``None``: known only once the data
            are read, as for your own data).
        build: :class:`DataRequest` -> :class:`DataPlan` (raises ``DataError`` naming the file).
        check_root: (root, names or None, :class:`~data.listcheck.CheckReport`) -> None: check every list
            file the benchmark needs under ``root`` (``tools/check_data.py``), adding the results to the report.
        detect: whether a folder has this benchmark's layout.
        primary: (``--dataset``, evaluated split names) -> the split whose top-1 is the run's ``top1``.
        protocol: one line on what is trained, evaluated and selected (launcher comments, README).
        table_layout: its results table (:class:`TableLayout`; default: datasets x methods).
        any_dataset_name: ``--dataset`` is any name the user chooses (it only names the run); such a benchmark
            is chosen with ``--benchmark``, never inferred from ``--dataset``.
    """

    name: str
    title: str
    aliases: Tuple[str, ...]
    table: str
    launcher_data_dir: str
    default_seeds: Tuple[int, ...]
    shot: str
    shot_help: str
    augment_train: bool
    eval_resize: Any  # a Fraction (exact: int(224 * 256/224) == 256)
    selects_on_val: bool
    targets: bool
    shot_in_names: bool
    canonical_dataset: Callable[[str], str]
    dataset_names: Tuple[str, ...]
    num_classes: Callable[[str], Optional[int]]
    build: Callable[[DataRequest], DataPlan]
    check_root: Callable[[str, Optional[Sequence[str]], Any], None]
    detect: Callable[[str], bool]
    protocol: str
    default_shot: Optional[int] = None
    default_eval_interval: Optional[int] = None
    primary: Callable[[str, Sequence[str]], str] = _test_split
    table_layout: TableLayout = TableLayout()
    any_dataset_name: bool = False

    def train_transform_is_deterministic(self) -> bool:
        return not self.augment_train

    def knows(self, dataset: str) -> bool:
        """Whether ``dataset`` names one of this benchmark's datasets."""
        try:
            self.canonical_dataset(dataset)
        except ValueError:
            return False
        return True

    def run_name(self, method: str, shot: Optional[int], eval_only: bool = False) -> str:
        """Sub-folder of a run under ``output/<benchmark>/<dataset>/``: ``<method>[_shot_<k>]``."""
        return f"{method}_shot_{shot}" if self.shot_in_names and not eval_only else method
