"""Validate a data root before a long run (used by ``tools/check_data.py``; cheap checks reusable by train.py).

Checks, for every list file a benchmark needs: the folders and list files exist, every line parses
(``path label``, split on the last whitespace run), labels lie in ``[0, num_classes)``, every listed image file
exists, and (optionally) every image decodes. Collects ALL problems instead of stopping at the first, and
reports image and class counts per split. Few-shot / DG training lists are also checked to hold exactly ``k``
images per class present (a warning otherwise).
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

from .benchmarks import canonical_benchmark
from .errors import DataError, require_root
from .listfile import inspect_image, iter_list_file
from .domain_generalization import (
    DG_NUM_CLASSES, DG_SEEDS, DG_SHOT, DG_SOURCE, DG_TARGETS, canonical_dg_target, dg_source_image_root,
    dg_source_list_path, dg_target_list_path, resolve_dg_target_image_root,
)
from .few_shot import FGFS_DATASETS, FGFS_SEEDS, FGFS_SHOTS, SPLIT_DIR, canonical_fgfs_name, fgfs_list_path
from .vtab import VTAB_SPLITS, VTAB_TASKS, get_vtab_task

__all__ = ["ListReport", "CheckReport", "detect_benchmark", "check_list", "check_data_root",
           "AUTO_IMAGE_CHECK_LIMIT"]

#: With ``check_images="auto"`` images are decoded when the root lists at most this many distinct files.
AUTO_IMAGE_CHECK_LIMIT = 5000
_MAX_SHOWN = 5  # problems of one kind listed per list file before "... and N more"


@dataclass
class ListReport:
    """Result of checking one list file."""

    group: str  # task / dataset / target the list belongs to
    split: str
    list_path: str
    num_classes: int
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
        if not self.lists:
            pass
        elif self.images_decoded is None:
            lines.append("Images: not decoded (pass --check_images to decode every image)")
        else:
            lines.append(f"Images: decoded {self.images_decoded} distinct file(s)")
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


def detect_benchmark(root: str) -> str:
    """``vtab`` / ``few_shot`` / ``domain_generalization`` from the folder layout, or :class:`DataError`."""
    require_root(root, "data root")
    if os.path.isdir(os.path.join(root, SPLIT_DIR)):
        return "few_shot"
    if any(os.path.isdir(os.path.join(root, t, "annotations")) for t in DG_TARGETS):
        return "domain_generalization"
    if any(os.path.isfile(os.path.join(root, t.folder, f"{s}.txt")) for t in VTAB_TASKS.values() for s in VTAB_SPLITS):
        return "vtab"
    if any(os.path.isfile(os.path.join(root, f"{s}.txt")) for s in VTAB_SPLITS):
        raise DataError(f"{root}: this looks like ONE VTAB task folder; pass the VTAB root that holds the task "
                        f"folders (its parent, {os.path.dirname(os.path.abspath(root))})")
    raise DataError(f"{root}: cannot tell the benchmark from the layout (expected VTAB task folders such as "
                    f"cifar/train800val200.txt, a few-shot root with {SPLIT_DIR}/, or a DG root with "
                    f"imagenet/annotations/); pass --benchmark")


def _cap(items: List[str], what: str) -> List[str]:
    if len(items) <= _MAX_SHOWN:
        return items
    return items[:_MAX_SHOWN] + [f"... and {len(items) - _MAX_SHOWN} more {what}"]


def check_list(group: str, split: str, image_root: str, list_path: str, num_classes: int,
               expected_per_class: Optional[int] = None) -> ListReport:
    """Check one list file (parsing, label range, file existence); images are decoded later, all at once."""
    rep = ListReport(group, split, list_path, num_classes)
    if not os.path.isfile(list_path):
        rep.errors.append(f"{list_path}: list file not found")
        return rep
    if not os.path.isdir(image_root):
        rep.errors.append(f"{image_root}: image folder not found (images of {list_path})")
        return rep
    bad_lines, missing = [], []
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
            if os.path.isfile(path):
                rep.files.append((path, where))
            else:
                missing.append(f"{path}: image file not found (listed at {where})")
    except DataError as e:
        rep.errors.append(str(e))
        return rep
    rep.errors += _cap(bad_lines, "malformed lines")
    rep.errors += _cap(missing, "missing files")
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


def _select(given: Optional[Sequence[str]], all_names: Sequence[str], present, canon, kind: str,
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


def _check_vtab(root: str, tasks, report: CheckReport) -> None:
    names = _select(tasks, list(VTAB_TASKS), lambda n: os.path.isdir(os.path.join(root, VTAB_TASKS[n].folder)),
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


def _check_fgfs(root: str, datasets, report: CheckReport, shots=FGFS_SHOTS, seeds=FGFS_SEEDS) -> None:
    split_root = os.path.join(root, SPLIT_DIR)
    if not os.path.isdir(split_root):
        report.errors.append(f"{split_root}: few-shot split folder not found")
        return
    names = _select(datasets, list(FGFS_DATASETS),
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


def _first_path(list_path: str) -> Optional[str]:
    try:
        for _, entry, _ in iter_list_file(list_path, None):
            if entry is not None:
                return entry.path
    except DataError:
        pass
    return None


def _check_dg(root: str, targets, report: CheckReport, seeds=DG_SEEDS, shot=DG_SHOT) -> None:
    src = os.path.join(root, DG_SOURCE)
    if not os.path.isdir(os.path.join(src, "annotations")):
        report.errors.append(f"{os.path.join(src, 'annotations')}: ImageNet source annotations not found")
    else:
        train_root = dg_source_image_root(root)
        for s in seeds:
            report.lists.append(check_list(f"{DG_SOURCE} (source)", f"train {shot}-shot seed {s}", train_root,
                                           dg_source_list_path(root, s, shot), DG_NUM_CLASSES,
                                           expected_per_class=shot))
    names = _select(targets, list(DG_TARGETS),
                    lambda n: os.path.isfile(dg_target_list_path(root, n)), canonical_dg_target,
                    "DG targets", report)
    for t in names:
        lp = dg_target_list_path(root, t)
        image_root = resolve_dg_target_image_root(root, t, _first_path(lp) if os.path.isfile(lp) else None)
        report.lists.append(check_list(f"{t} (target)", "val", image_root, lp, DG_NUM_CLASSES))


def _decode_all(report: CheckReport, workers: Optional[int]) -> None:
    """Decode every distinct listed file once; report an unreadable one in each list that names it."""
    paths = list(dict.fromkeys(p for r in report.lists for p, _ in r.files))
    n = workers or min(8, os.cpu_count() or 1)
    if n > 1 and len(paths) > 64:
        with ThreadPoolExecutor(n) as ex:
            found = list(ex.map(inspect_image, paths, chunksize=32))
    else:
        found = [inspect_image(p) for p in paths]
    bad = {p: e for p, (e, _) in zip(paths, found) if e is not None}
    noted = {p: note for p, (_, note) in zip(paths, found) if note is not None}
    if bad:
        for r in report.lists:
            r.errors += _cap([f"{p}: {bad[p]} (listed at {where})" for p, where in r.files if p in bad],
                             "unreadable images")
    if noted:
        for r in report.lists:
            r.warnings += _cap([f"{p}: {noted[p]} (listed at {where})" for p, where in r.files if p in noted],
                               "16-bit images")
    report.images_decoded = len(paths)


def check_data_root(
        root: str,
        benchmark: Optional[str] = None,
        tasks: Optional[Sequence[str]] = None,
        check_images: Union[bool, str] = "auto",
        workers: Optional[int] = None,
) -> CheckReport:
    """Check a data root and return a :class:`CheckReport` (never raises for data problems).

    Args:
        root: the data root (VTAB-1k root, FGFS root or DG root).
        benchmark: ``vtab`` / ``few_shot`` / ``domain_generalization``; ``None``: detected from the layout.
        tasks: VTAB tasks / few-shot datasets / DG targets to check; ``None``: those present (absent ones are
            noted, not errors). Named ones must be present.
        check_images: decode every image (``True``), never (``False``), or ``"auto"``: when the root lists at
            most :data:`AUTO_IMAGE_CHECK_LIMIT` distinct files.
        workers: threads for decoding.
    """
    detected = benchmark is None
    if detected:
        try:
            bench = detect_benchmark(root)
        except DataError as e:
            rep = CheckReport(root, "unknown", True)
            rep.errors.append(str(e))
            return rep
    else:
        bench = canonical_benchmark(benchmark)
    rep = CheckReport(root, bench, detected)
    try:
        require_root(root, "data root")
    except DataError as e:
        rep.errors.append(str(e))
        return rep
    if bench == "vtab":
        _check_vtab(root, tasks, rep)
    elif bench == "few_shot":
        _check_fgfs(root, tasks, rep)
    else:
        _check_dg(root, tasks, rep)
    n_files = len({p for r in rep.lists for p, _ in r.files})
    if check_images == "auto":
        do = n_files <= AUTO_IMAGE_CHECK_LIMIT
        if not do:
            rep.notes.append(f"{n_files} distinct image files: not decoded by default (more than "
                             f"{AUTO_IMAGE_CHECK_LIMIT}); pass --check_images to decode them all")
    elif isinstance(check_images, bool):
        do = check_images
    else:
        raise ValueError(f"check_images must be True, False or 'auto', got {check_images!r}")
    if do:
        _decode_all(rep, workers)
    return rep
