"""Checking list files (the part of the data checks every benchmark shares): :func:`check_list` checks one
list file, :class:`CheckReport` collects the results of a data root. The benchmark modules check their own
layouts with these (``Benchmark.check_root``); :mod:`data.check` runs them."""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .benchmark import DataPlan
from .errors import DataError
from .listfile import iter_list_file, missing_reason

__all__ = ["ListReport", "CheckReport", "check_list", "select_names", "first_path", "check_plan", "split_role",
           "report_overlap", "OVERLAP_FLAG"]

_logger = logging.getLogger(__name__)

#: The train.py flag that accepts images in both a training and a test list.
OVERLAP_FLAG = "--allow_train_test_overlap"

_MAX_SHOWN = 5  # problems of one kind listed per list file before "... and N more"


@dataclass
class ListReport:
    """Result of checking one list file."""

    group: str  # task / dataset / target the list belongs to
    split: str
    list_path: str
    num_classes: int
    role: str = "train"  # "train", "val" or "test" (duplicates are refused in test lists; overlap train/test)
    n_samples: int = 0
    n_classes_seen: int = 0
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    files: List[Tuple[str, str]] = field(default_factory=list)  # (absolute path, "list:line") of existing files

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class CheckReport:
    """Result of checking a data root; :meth:`format` renders it for people."""

    root: str
    benchmark: str
    detected: bool
    lists: List[ListReport] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    images_decoded: Optional[int] = None  # None: not decoded

    @property
    def all_errors(self) -> List[str]:
        return self.errors + [e for r in self.lists for e in r.errors]

    @property
    def all_warnings(self) -> List[str]:
        return self.warnings + [w for r in self.lists for w in r.warnings]

    @property
    def ok(self) -> bool:
        return not self.all_errors

    def format(self) -> str:
        bench = (f"{self.benchmark} (detected from the layout)" if self.detected else self.benchmark) \
            if self.benchmark != "unknown" else "not detected"
        lines = [f"Data root: {self.root}", f"Benchmark: {bench}"]
        group = None
        for r in self.lists:
            if r.group != group:
                group = r.group
                lines.append(f"  {group} ({r.num_classes} classes)")
            status = "OK" if r.ok else f"{len(r.errors)} problem(s)"
            lines.append(f"    {r.split:<28} {r.n_samples:>7} images  {r.n_classes_seen:>4}/{r.num_classes} "
                         f"classes  {status}")
        if self.lists:
            lines.append("Images: not decoded (pass --check_images to decode every image)" if self.images_decoded is None
                         else f"Images: decoded {self.images_decoded} distinct file(s)")
        for n in self.notes:
            lines.append(f"Note: {n}")
        warns = self.all_warnings
        if warns:
            lines.append(f"Warnings ({len(warns)}):")
            lines += [f"  - {w}" for w in warns]
        errs = self.all_errors
        if errs:
            lines.append(f"Problems ({len(errs)}):")
            lines += [f"  - {e}" for e in errs]
            lines.append(f"Result: FAILED ({len(errs)} problem(s))")
        else:
            lines.append("Result: OK" + (f" ({len(warns)} warning(s))" if warns else ""))
        return "\n".join(lines)


def cap_list(items: List[str], what: str) -> List[str]:
    if len(items) <= _MAX_SHOWN:
        return items
    return items[:_MAX_SHOWN] + [f"... and {len(items) - _MAX_SHOWN} more {what}"]


def split_role(split: str) -> str:
    """``train`` for a split named ``train...``, ``val`` for ``val...``, else ``test``."""
    return "train" if split.startswith("train") else "val" if split.startswith("val") else "test"


def _duplicate_problem(list_path: str, role: str, repeats: List[Tuple[str, int, int]]) -> str:
    path, line, first = repeats[0]
    what = (f"{list_path}:{line}: {path} is listed again (first at line {first}; {len(repeats)} duplicate "
            f"line(s) in this list)")
    if role == "test":
        return what + ": a test list must hold each image once (a duplicate counts it twice in the measure)"
    return what + ": the image is seen more often per epoch"


def check_list(group: str, split: str, image_root: str, list_path: str, num_classes: int,
               expected_per_class: Optional[int] = None, role: Optional[str] = None) -> ListReport:
    """Check one list file (parsing, label range, file existence, duplicate lines: a warning in training and
    validation lists, a problem in test lists; ``role`` defaults to :func:`split_role`); images are decoded
    later, all at once."""
    rep = ListReport(group, split, list_path, num_classes, role or split_role(split))
    if not os.path.isfile(list_path):
        rep.errors.append(f"{list_path}: list file not found")
        return rep
    if not os.path.isdir(image_root):
        rep.errors.append(f"{image_root}: image folder not found (images of {list_path})")
        return rep
    bad_lines, missing = [], []
    first_line: Dict[str, int] = {}
    repeats: List[Tuple[str, int, int]] = []
    labels: Counter = Counter()
    try:
        for line_no, entry, problem in iter_list_file(list_path, num_classes):
            if problem is not None:
                bad_lines.append(f"{list_path}:{line_no}: {problem}")
                continue
            rep.n_samples += 1
            labels[entry.label] += 1
            path = os.path.normpath(os.path.join(image_root, entry.path))
            where = f"{list_path}:{line_no}"
            if path in first_line:
                repeats.append((path, line_no, first_line[path]))
                continue
            first_line[path] = line_no
            if os.path.isfile(path):
                rep.files.append((path, where))
            else:
                missing.append(f"{path}: {missing_reason(path)} (listed at {where})")
    except DataError as e:
        rep.errors.append(str(e))
        return rep
    rep.errors += cap_list(bad_lines, "malformed lines")
    rep.errors += cap_list(missing, "missing files")
    if repeats:
        (rep.errors if rep.role == "test" else rep.warnings).append(_duplicate_problem(list_path, rep.role, repeats))
    if rep.n_samples == 0 and not bad_lines:
        rep.errors.append(f"{list_path}: list file has no samples")
    rep.n_classes_seen = len(labels)
    if expected_per_class is not None and labels:
        off = sorted(c for c, n in labels.items() if n != expected_per_class)
        if off:
            ex = ", ".join(f"class {c}: {labels[c]}" for c in off[:5]) + (" ..." if len(off) > 5 else "")
            rep.warnings.append(f"{list_path}: expected {expected_per_class} images per class, "
                                f"{len(off)} class(es) differ ({ex})")
    return rep


def select_names(given: Optional[Sequence[str]], all_names: Sequence[str], present, canon, kind: str,
            report: CheckReport) -> List[str]:
    if given:
        names = []
        for g in given:
            try:
                names.append(canon(g))
            except ValueError as e:
                report.errors.append(str(e))
        return names
    names = [n for n in all_names if present(n)]
    absent = [n for n in all_names if not present(n)]
    if not names:
        report.errors.append(f"{report.root}: no {kind} found")
    elif absent:
        report.notes.append(f"{kind} not present (not checked): {', '.join(absent)}")
    return names


def first_path(list_path: str) -> Optional[str]:
    try:
        for _, entry, _ in iter_list_file(list_path, None):
            if entry is not None:
                return entry.path
    except DataError:
        pass
    return None


def report_overlap(report: CheckReport, allow_overlap: bool = False) -> None:
    """Add to ``report`` every test list that shares images (the same resolved path) with a training list: a
    problem, or a warning with ``allow_overlap``."""
    trained: Dict[str, str] = {}
    for r in report.lists:
        if r.role == "train":
            for path, where in r.files:
                trained.setdefault(path, where)
    for r in report.lists:
        if r.role != "test":
            continue
        shared = [(p, where) for p, where in r.files if p in trained]
        if shared:
            msg = _overlap_message(r.list_path, len(shared), shared[0][0], shared[0][1], trained[shared[0][0]])
            (r.warnings if allow_overlap else r.errors).append(msg)


def _overlap_message(test_list: str, n: int, path: str, test_where: str, train_where: str) -> str:
    return (f"{test_list}: {n} image(s) are also in a training list, e.g. {path} (listed at {test_where} and "
            f"{train_where}): testing on training images inflates the measure ({OVERLAP_FLAG} if intended)")


def _paths(ds: Any) -> List[str]:
    return [p for p, _ in ds.samples]


def _duplicates(ds: Any) -> List[Tuple[str, int, int]]:
    """``(path, line, first line)`` of every repeated sample of a list dataset."""
    first: Dict[str, int] = {}
    out = []
    for i, path in enumerate(_paths(ds)):
        if path in first:
            out.append((path, ds.line_no(i), ds.line_no(first[path])))
        else:
            first[path] = i
    return out


def check_plan(plan: DataPlan, allow_overlap: bool = False) -> None:
    """Duplicates and train/test overlap in the datasets of a run (each dataset has ``samples``, ``list_path``
    and ``line_no``): a repeated image in a training or validation list is a warning with the count, in a test
    list a :class:`DataError`; an image in both a seed's training list and one of its test lists (the same
    resolved path) is a :class:`DataError` unless ``allow_overlap`` (then a warning)."""
    seen: Dict[int, str] = {}
    for seed in plan.seeds:
        roles = [("train", seed.train), ("val", seed.val), *[("test", t) for t in seed.tests.values()]]
        for role, ds in roles:
            if ds is None or id(ds) in seen:
                continue
            seen[id(ds)] = role
            repeats = _duplicates(ds)
            if repeats and role == "test":
                raise DataError(_duplicate_problem(ds.list_path, role, repeats))
            if repeats:
                _logger.warning("%s", _duplicate_problem(ds.list_path, role, repeats))
        if seed.train is None:
            continue
        trained = {p: i for i, p in enumerate(_paths(seed.train))}
        for test in seed.tests.values():
            shared = [(i, trained[p]) for i, p in enumerate(_paths(test)) if p in trained]
            if not shared:
                continue
            i, j = shared[0]
            msg = _overlap_message(test.list_path, len(shared), _paths(test)[i], f"{test.list_path}:{test.line_no(i)}",
                                   f"{seed.train.list_path}:{seed.train.line_no(j)}")
            if not allow_overlap:
                raise DataError(msg)
            _logger.warning("%s", msg)
