"""Your own data (``--benchmark folder``): image folders or list files under one root, no code to write.

Layout (each split on its own; ``val`` is optional)::

    <root>/train/<class>/**/<image>    or   <root>/train.txt   or   <root>/train.csv
    <root>/val/<class>/**/<image>      or   <root>/val.txt     or   <root>/val.csv
    <root>/test/<class>/**/<image>     or   <root>/test.txt    or   <root>/test.csv
    <root>/classes.txt                 optional: one class name per line, line i = label i

A list file of a split wins over a folder of the same name (the list may point into it). ``.txt`` lines are
``path label``, split on the last whitespace run (paths may hold spaces, labels may not); ``.csv`` rows are
``path,label`` (CSV quoting for commas, quotes or spaces). Either may start with a header line: the first line
is taken as one when its path is no file under the root and its label neither a class index nor a class name.
Relative paths start from the root. A label of ASCII digits is a class index, anything else a class name; a
label of digits that is no class index (not below the class count) but a class name is that class, and one that
is the index of one class and the name of another is refused.

Classes: ``classes.txt`` when present; else the sorted folder names of ``train/`` (as torchvision's
ImageFolder); else the sorted class names of the training list; else (integer labels) ``0 .. max``. A class in
``val`` or ``test`` that is none of these is refused naming the file, the class and the line: it has no training
images, so the model cannot predict it. The class count is the number of classes; ``check_num_classes`` compares
it with a count given on the command line.

Protocol: train on ``train``. With a ``val`` split: validate every ``--eval_interval`` (10) epochs, test the best
validation weights (the few-shot rule); without: test once after the last epoch (the VTAB-1k rule). The
recipe of the launchers ``train_scripts/custom/`` is the VTAB-1k one (no augmentation; see the README).
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from .benchmark import Benchmark, DataPlan, DataRequest, SeedPlan
from .errors import DataError, UnknownNameError, require_root
from .listcheck import CheckReport, ListReport, cap_list, check_plan
from .listfile import ListEntry, missing_reason, parse_index, read_lines, split_line

if TYPE_CHECKING:  # the torch Dataset is imported only when a dataset is built
    from .datasets import ListFileDataset

__all__ = ["FOLDER_SPLITS", "IMAGE_EXTENSIONS", "CLASSES_FILE", "canonical_folder_name", "split_source",
           "read_classes", "FolderClasses", "folder_classes", "split_entries", "classes_without_images",
           "build_folder_plan", "check_folder_root", "looks_like_folder_root", "list_rows", "BENCHMARK"]

_logger = logging.getLogger(__name__)

FOLDER_SPLITS: Tuple[str, ...] = ("train", "val", "test")
CLASSES_FILE = "classes.txt"
#: Files of an image folder that are read as images (lower-case suffixes); other files are ignored.
IMAGE_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                                     ".pgm", ".pbm")

Row = Tuple[str, str, int]  # (path as written, label text, 1-based line of the list / position in the folder)


def canonical_folder_name(name: str) -> str:
    """``--dataset`` for your own data: any name (it names the run folder and results.json) without a path
    separator."""
    key = name.strip()
    if not key or key in (".", "..") or any(c in key for c in "/\\\0"):
        raise UnknownNameError(f"name your data with a plain folder name (no '/', not '.' or '..'; it only names "
                               f"the run), got {name!r}")
    return key


def split_source(root: str, split: str) -> Optional[str]:
    """The list file (``<split>.txt`` / ``<split>.csv``) or folder (``<split>/``) of a split, ``None`` if absent."""
    lists = [p for p in (os.path.join(root, f"{split}.txt"), os.path.join(root, f"{split}.csv")) if os.path.isfile(p)]
    if len(lists) > 1:
        raise DataError(f"{lists[1]}: both {split}.txt and {split}.csv exist; keep one")
    if lists:
        return lists[0]
    folder = os.path.join(root, split)
    return folder if os.path.isdir(folder) else None


def read_classes(root: str) -> Optional[List[str]]:
    """The names of ``<root>/classes.txt`` (line i = label i; blank lines only at the end), ``None`` if absent."""
    path = os.path.join(root, CLASSES_FILE)
    if not os.path.isfile(path):
        return None
    lines = read_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    seen: Dict[str, int] = {}
    for i, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            raise DataError(f"{path}:{i}: empty class name (line i names class i-1; remove the blank line)")
        if name in seen:
            raise DataError(f"{path}:{i}: class {name!r} is named again (first at line {seen[name]})")
        seen[name] = i
    if not lines:
        raise DataError(f"{path}: no class names")
    return [line.strip() for line in lines]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _folder_rows(root: str, folder: str) -> List[Row]:
    """``(path relative to root, class folder name, position)`` of every image below ``folder/<class>/``."""
    loose = sorted(n for n in os.listdir(folder) if _is_image(n) and os.path.isfile(os.path.join(folder, n)))
    if loose:
        raise DataError(f"{os.path.join(folder, loose[0])}: image outside a class folder (expected "
                        f"{folder}/<class>/<image>)")
    rows: List[Row] = []
    for cls in _class_folders(folder):
        for dirpath, dirs, files in os.walk(os.path.join(folder, cls), followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if _is_image(name):
                    rows.append((os.path.relpath(os.path.join(dirpath, name), root), cls, len(rows) + 1))
    return rows


def _class_folders(folder: str) -> List[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isdir(os.path.join(folder, n)))


def list_rows(root: str, path: str, known: Dict[str, int], labels_required: bool = True) -> List[Row]:
    """The ``(path, label, line)`` rows of a ``.txt`` (``.lst``) or ``.csv`` list, without its header line if any.
    ``labels_required=False`` (images to predict): a line may be a path alone (label ``""``); a whole line that
    names a file under ``root`` is a path, even with spaces in it."""
    lines = read_lines(path)
    rows: List[Row] = []
    if path.endswith(".csv"):
        for n, fields in enumerate(csv.reader(lines), start=1):
            if not fields or not "".join(fields).strip():
                continue
            if len(fields) != 2 and (labels_required or len(fields) != 1):
                raise DataError(f"{path}:{n}: expected 2 columns 'path,label', got {len(fields)} ({lines[n - 1]!r}; "
                                f"quote a path holding a comma)")
            rows.append((fields[0].strip(), fields[1].strip() if len(fields) == 2 else "", n))
    else:
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = split_line(line)
            if not labels_required and (fields is None or os.path.isfile(os.path.join(root, line.strip()))):
                fields = (line.strip(), "")  # a path alone
            if fields is None:
                raise DataError(f"{path}:{n}: expected '<path> <label>', got {line.strip()!r} (no label)")
            rows.append((fields[0], fields[1], n))
    if rows and _is_header(root, rows, known, labels_required):
        _logger.info("%s:%d: header line %r skipped", path, rows[0][2], ",".join(rows[0][:2]))
        rows = rows[1:]
    return rows


def _is_header(root: str, rows: Sequence[Row], known: Dict[str, int], labels_required: bool = True) -> bool:
    """Whether the first row is a header: its path is no file, its label no index, no known class name and no
    label of another row (a list without labels: its path is no file and its label no index)."""
    path, label, _ = rows[0]
    if os.path.isfile(os.path.join(root, path)) or parse_index(label) is not None:
        return False
    return not labels_required or (label not in known and all(label != other for _, other, _ in rows[1:]))


def _rows(root: str, source: str, known: Dict[str, int]) -> List[Row]:
    rows = _folder_rows(root, source) if os.path.isdir(source) else list_rows(root, source, known)
    if not rows:
        raise DataError(f"{source}: no images" + (" (no <class>/<image> below it)" if os.path.isdir(source) else ""))
    return rows


@dataclass
class FolderClasses:
    """The classes of a root: ``names`` (``None`` for integer labels without classes.txt), ``count``, and where
    they come from (``origin``, for messages)."""

    names: Optional[List[str]]
    count: int
    origin: str

    def __post_init__(self) -> None:
        self.index_of: Dict[str, int] = {n: i for i, n in enumerate(self.names or ())}


def folder_classes(root: str, train_source: str) -> FolderClasses:
    """The classes: classes.txt, else train's folder names, else the training list's names or indices."""
    names = read_classes(root)
    if names is not None:
        return FolderClasses(names, len(names), os.path.join(root, CLASSES_FILE))
    if os.path.isdir(train_source):
        names = _class_folders(train_source)
        if not names:
            raise DataError(f"{train_source}: no class folders (expected {train_source}/<class>/<image>)")
        return FolderClasses(names, len(names), f"the folders of {train_source}")
    rows = _rows(root, train_source, {})
    indices = [parse_index(label) for _, label, _ in rows]
    if all(i is not None for i in indices):
        return FolderClasses(None, max(indices) + 1, f"the labels of {train_source}")
    if any(i is not None for i in indices):
        i = next(k for k, v in enumerate(indices) if v is not None)
        j = next(k for k, v in enumerate(indices) if v is None)
        raise DataError(f"{train_source}:{rows[i][2]}: class index {rows[i][1]!r} in a list that names classes "
                        f"(e.g. {rows[j][1]!r} at line {rows[j][2]}); use one kind, or write {CLASSES_FILE}")
    names = sorted({label for _, label, _ in rows})
    return FolderClasses(names, len(names), f"the class names of {train_source}")


def _label_index(label: str, classes: FolderClasses, folder: bool) -> Tuple[Optional[int], Optional[str]]:
    """``(index, None)`` of a label (a class folder's name: by name when classes are named), or
    ``(None, problem)``. A list label of digits that is a class name but no class index (not below the class
    count) is that name; one that is the index of one class and the name of another is refused."""
    by_name = classes.index_of.get(label)
    index = parse_index(label) if not (folder and classes.names) else None
    if by_name is not None and index is not None and not 0 <= index < classes.count:
        index = None  # no class has this index: the label can only be the name
    if by_name is not None and index is not None and by_name != index:
        return None, (f"label {label!r} is both class index {index} and the name of class {by_name} "
                      f"(rename the classes, e.g. zero-padded, or list them in {CLASSES_FILE} in index order)")
    if by_name is not None:
        return by_name, None
    if index is not None:
        if 0 <= index < classes.count:
            return index, None
        return None, (f"class index {index} is outside the {classes.count} classes (from {classes.origin}); a "
                      f"class without training images cannot be learned")
    if classes.names is None:
        return None, (f"label {label!r} is not a class index (ASCII digits 0-9), and the classes (from "
                      f"{classes.origin}) have no names (write {CLASSES_FILE})")
    return None, (f"class {label!r} is not among the {classes.count} classes (from {classes.origin}); a class "
                  f"without training images cannot be learned")


def split_entries(root: str, source: str, classes: FolderClasses) -> Tuple[List[ListEntry], List[str]]:
    """The samples of one split (paths relative to the root) and every label problem (``file:line: ...``; for
    an image folder the class folder)."""
    entries: List[ListEntry] = []
    problems: List[str] = []
    folder = os.path.isdir(source)
    for path, label, line in _rows(root, source, classes.index_of):
        index, problem = _label_index(label, classes, folder)
        if problem is None:
            entries.append(ListEntry(path, index, line))
        elif folder:
            problems.append(f"{os.path.join(source, label)}: {problem}")
        else:
            problems.append(f"{source}:{line}: {problem}")
    return entries, list(dict.fromkeys(problems))  # an image folder's problem once per class folder


def _sources(root: str) -> Dict[str, Optional[str]]:
    """Every split's source; ``DataError`` unless train and test exist."""
    sources = {s: split_source(root, s) for s in FOLDER_SPLITS}
    for s in ("train", "test"):
        if sources[s] is None:
            raise DataError(f"{os.path.join(root, s)}: no {s} split (expected {s}/<class>/<image>, {s}.txt or "
                            f"{s}.csv; see the README's 'Your own data')")
    return sources


def _dataset(root: str, source: str, classes: FolderClasses, transform, kwargs) -> "ListFileDataset":
    entries, problems = split_entries(root, source, classes)
    if problems:
        raise DataError(problems[0] + (f" ({len(problems)} problems in this split)" if len(problems) > 1 else ""))
    from .datasets import ListFileDataset

    return ListFileDataset(root, source, classes.count, transform=transform, entries=entries, **kwargs)


def classes_without_images(train_source: str, classes: FolderClasses, labels: Sequence[int]) -> Optional[str]:
    """The warning (train.py's and the checker's) about classes of which the training split holds no image
    (an empty ``train/<class>/`` folder, a class of classes.txt or an index the training list skips), ``None``
    when every class has one."""
    unused = sorted(set(range(classes.count)) - set(labels))
    if not unused:
        return None
    shown = ", ".join(repr(classes.names[c]) if classes.names else str(c) for c in unused[:5])
    return (f"{train_source}: {len(unused)} of {classes.count} classes have no training image ({shown}"
            f"{' ...' if len(unused) > 5 else ''})")


def build_folder_plan(req: DataRequest) -> DataPlan:
    """Every seed trains on ``train``, selects on ``val`` when it exists and is tested on ``test``."""
    require_root(req.data_dir, "data root")
    root = req.data_dir
    sources = _sources(root)
    classes = folder_classes(root, sources["train"])
    if classes.count < 2:
        raise DataError(f"{sources['train']}: one class found ({classes.origin}); a classifier needs at least two")
    kw = req.dataset_kwargs
    test = _dataset(root, sources["test"], classes, req.test_transform, kw)
    train = val = None
    if req.need_train:
        train = _dataset(root, sources["train"], classes, req.train_transform, kw)
        unused = classes_without_images(sources["train"], classes, train.targets)
        if unused:
            _logger.warning("%s", unused)
        if sources["val"] is not None:
            val = _dataset(root, sources["val"], classes, req.test_transform, kw)
    seeds = [SeedPlan(i, s, train, val, {"test": test}) for i, s in enumerate(req.seeds)]
    plan = DataPlan(classes.count, seeds, canonical_folder_name(req.dataset), class_names=classes.names)
    check_plan(plan, req.allow_overlap)
    return plan


def _check_split(root: str, split: str, source: str, classes: FolderClasses) -> ListReport:
    rep = ListReport(os.path.basename(os.path.normpath(root)), split, source, classes.count, split)
    try:
        entries, problems = split_entries(root, source, classes)
    except DataError as e:
        rep.errors.append(str(e))
        return rep
    rep.errors += cap_list(problems, "label problems")
    first: Dict[str, int] = {}
    repeats, missing = [], []
    for e in entries:
        path = os.path.normpath(os.path.join(root, e.path))
        where = f"{source}:{e.line_no}"
        rep.n_samples += 1
        if path in first:
            repeats.append(f"{where}: {path} is listed again (first at line {first[path]})")
        elif os.path.isfile(path):
            first[path] = e.line_no
            rep.files.append((path, where))
        else:
            first[path] = e.line_no
            missing.append(f"{path}: {missing_reason(path)} (listed at {where})")
    rep.errors += cap_list(missing, "missing files")
    if repeats:
        note = (" (a test list must hold each image once)" if split == "test"
                else " (seen more often per epoch)")
        (rep.errors if split == "test" else rep.warnings).append(
            f"{source}: {len(repeats)} duplicate line(s){note}: " + "; ".join(repeats[:3]))
    rep.n_classes_seen = len({e.label for e in entries})
    unused = classes_without_images(source, classes, [e.label for e in entries]) if split == "train" else None
    if unused and not problems:  # with label problems, the lines of a class may be among the bad ones
        rep.warnings.append(unused)
    return rep


def check_folder_root(root: str, names: Optional[Sequence[str]], report: CheckReport) -> None:
    """The checker's view of a root of your own data: classes, images per split, every problem."""
    if names:
        report.errors.append("--tasks does not apply to your own data (the root holds one dataset)")
        return
    try:
        sources = _sources(root)
        classes = folder_classes(root, sources["train"])
    except DataError as e:
        report.errors.append(str(e))
        return
    shown = ", ".join(classes.names[:10]) + (" ..." if len(classes.names) > 10 else "") if classes.names else None
    report.notes.append(f"{classes.count} classes from {classes.origin}" + (f": {shown}" if shown else ""))
    if classes.count < 2:
        report.errors.append(f"{sources['train']}: one class found; a classifier needs at least two")
    for split in FOLDER_SPLITS:
        if sources[split] is not None:
            report.lists.append(_check_split(root, split, sources[split], classes))
    if sources["val"] is None:
        report.notes.append("no val split: the test split is evaluated once after the last epoch (no selection)")


def looks_like_folder_root(root: str) -> bool:
    """A root with a train and a test split (folders with class sub-folders, or .txt / .csv lists)."""
    def present(split: str) -> bool:
        folder = os.path.join(root, split)
        return (any(os.path.isfile(os.path.join(root, f"{split}{ext}")) for ext in (".txt", ".csv"))
                or (os.path.isdir(folder) and bool(_class_folders(folder))))

    return present("train") and present("test")


def _num_classes_of_data(name: str) -> None:
    """Unknown from the name: the count comes from the data (classes.txt or the classes of train)."""
    return None


BENCHMARK = Benchmark(
    name="folder", title="your own data", aliases=("imagefolder", "own_data"), table="folder",
    launcher_data_dir="/path/to/my_data", default_seeds=(0,),
    shot="none", shot_help="your own data trains on its whole train split",
    augment_train=False, eval_resize=1, selects_on_val=True, default_eval_interval=10, targets=False,
    shot_in_names=False, canonical_dataset=canonical_folder_name, dataset_names=(),
    num_classes=_num_classes_of_data, build=build_folder_plan, check_root=check_folder_root,
    detect=looks_like_folder_root, any_dataset_name=True,
    protocol=("train on train; with a val split, validate every --eval_interval (10) epochs and test the best\n"
              "validation weights; without one, evaluate test once after the last epoch (no selection)."),
)
