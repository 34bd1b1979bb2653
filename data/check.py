"""Validate a data root before a long run (used by ``tools/check_data.py``).

Checks, for every list file a benchmark needs: the folders and list files exist, every line parses
(``path label``, split on the last whitespace run), labels lie in ``[0, num_classes)``, every listed image file
exists, no list holds an image twice (a warning for training lists, a problem for test lists), no test image
is also a training image, and (optionally) every image decodes. Collects ALL problems instead of stopping at
the first, and reports image and class counts per split. Few-shot / DG training lists are also checked to hold exactly ``k``
images per class present (a warning otherwise). What a benchmark's root holds is checked by its own
``Benchmark.check_root`` (in its module), the layout is recognised by ``Benchmark.detect``.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence, Union

from .benchmarks import REGISTRY, get_benchmark
from .errors import DataError, require_root
from .listcheck import CheckReport, ListReport, cap_list, check_list, report_overlap
from .listfile import inspect_image
from .vtab import VTAB_SPLITS

__all__ = ["ListReport", "CheckReport", "detect_benchmark", "check_list", "check_data_root",
           "AUTO_IMAGE_CHECK_LIMIT"]

#: With ``check_images="auto"`` images are decoded when the root lists at most this many distinct files.
AUTO_IMAGE_CHECK_LIMIT = 5000


def detect_benchmark(root: str) -> str:
    """The benchmark whose layout ``root`` has (``Benchmark.detect``), or :class:`DataError`."""
    require_root(root, "data root")
    for bench in REGISTRY.values():
        if bench.detect(root):
            return bench.name
    if any(os.path.isfile(os.path.join(root, f"{s}.txt")) for s in VTAB_SPLITS):
        raise DataError(f"{root}: this looks like ONE VTAB task folder; pass the VTAB root that holds the task "
                        f"folders (its parent, {os.path.dirname(os.path.abspath(root))})")
    raise DataError(f"{root}: cannot tell the benchmark from the layout (expected VTAB task folders such as "
                    f"cifar/train800val200.txt, a few-shot root with few-shot_split/, a DG root with "
                    f"imagenet/annotations/, or your own data: train/<class>/<image> and test/<class>/<image>, "
                    f"or train.txt / train.csv and test.txt / test.csv); pass --benchmark")


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
            r.errors += cap_list([f"{p}: {bad[p]} (listed at {where})" for p, where in r.files if p in bad],
                             "unreadable images")
    if noted:
        for r in report.lists:
            r.warnings += cap_list([f"{p}: {noted[p]} (listed at {where})" for p, where in r.files if p in noted],
                               "16-bit images")
    report.images_decoded = len(paths)


def check_data_root(
        root: str,
        benchmark: Optional[str] = None,
        tasks: Optional[Sequence[str]] = None,
        check_images: Union[bool, str] = "auto",
        workers: Optional[int] = None,
        allow_overlap: bool = False,
) -> CheckReport:
    """Check a data root and return a :class:`CheckReport` (never raises for data problems).

    Args:
        root: the data root (VTAB-1k root, FGFS root, DG root or a root of your own data).
        benchmark: ``vtab`` / ``few_shot`` / ``domain_generalization`` / ``folder``; ``None``: detected from the
            layout.
        tasks: VTAB tasks / few-shot datasets / DG targets to check; ``None``: those present (absent ones are
            noted, not errors). Named ones must be present.
        check_images: decode every image (``True``), never (``False``), or ``"auto"``: when the root lists at
            most :data:`AUTO_IMAGE_CHECK_LIMIT` distinct files.
        workers: threads for decoding.
        allow_overlap: images in both a training and a test list are a warning instead of a problem.
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
        bench = get_benchmark(benchmark).name
    rep = CheckReport(root, bench, detected)
    try:
        require_root(root, "data root")
    except DataError as e:
        rep.errors.append(str(e))
        return rep
    get_benchmark(bench).check_root(root, tasks, rep)
    report_overlap(rep, allow_overlap)
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
