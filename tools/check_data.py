#!/usr/bin/env python3
"""Validate a data root before a long run.

    python tools/check_data.py /data/vtab-1k                       # benchmark detected from the layout
    python tools/check_data.py /data/FGFS --tasks food101 --check_images
    python tools/check_data.py /data/DG --benchmark domain_generalization --tasks imagenet-sketch
    python tools/check_data.py /data/my_data                       # your own data (train/ + test/, or lists)

Checks the folders and list files each benchmark needs, every list line (``path label``, split on the last
whitespace run), labels against the class count, missing image files, duplicate lines (a warning in training
lists, a problem in test lists), test images that are also training images (a problem unless
--allow_train_test_overlap), and (``--check_images``; by default
only for roots listing at most 5000 images) unreadable images; 16-bit images are listed as warnings (they are
scaled to 8 bits at load), 32-bit integer/float images as problems; a class of your own data without training
images is a warning, worded as train.py's. Prints image/class counts per split and every
problem with its file and line. Exit status: 0 = OK (warnings allowed), 1 = problems found, 2 = bad usage.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.check import AUTO_IMAGE_CHECK_LIMIT, check_data_root  # noqa: E402
from data.benchmarks import BENCHMARKS  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("root", help="data root: the VTAB-1k folder, the FGFS folder, the DG folder or your own data")
    parser.add_argument("--benchmark", choices=BENCHMARKS + ("dg", "fgfs"), default=None,
                        help="benchmark of the root (default: detected from the layout)")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="NAME",
                        help="VTAB tasks / few-shot datasets / DG targets to check (space or comma separated; "
                             "default: all that are present)")
    img = parser.add_mutually_exclusive_group()
    img.add_argument("--check_images", dest="check_images", action="store_const", const=True, default="auto",
                     help=f"decode every image (default: only when the root lists <= {AUTO_IMAGE_CHECK_LIMIT})")
    img.add_argument("--no_check_images", dest="check_images", action="store_const", const=False,
                     help="never decode images (existence is still checked)")
    parser.add_argument("--workers", type=int, default=None, help="threads for decoding images")
    parser.add_argument("--allow_train_test_overlap", action="store_true",
                        help="images in both a training and a test list are a warning, not a problem")
    args = parser.parse_args(argv)
    tasks = None
    if args.tasks:
        tasks = [t for item in args.tasks for t in item.split(",") if t.strip()]
    report = check_data_root(args.root, benchmark=args.benchmark, tasks=tasks, check_images=args.check_images,
                             workers=args.workers, allow_overlap=args.allow_train_test_overlap)
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
