#!/usr/bin/env python3
"""Write a small generated data root in the real on-disk layout of a benchmark, to try things out.

    python tools/make_synthetic_data.py vtab /tmp/vtab --tasks cifar_100 dsprites_loc
    python tools/make_synthetic_data.py few_shot /tmp/fgfs --classes 4
    python tools/make_synthetic_data.py dg /tmp/dg --tasks imagenet-sketch
    python tools/make_synthetic_data.py folder /tmp/my_data --classes 5 --n_val 2   # your own data's layout

The images are learnable procedural scenes (or noise with ``--kind noise``) written by ``data/synthetic.py``; the
tests and the demo use the same generators.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.domain_generalization import DG_TARGETS  # noqa: E402
from data.few_shot import FGFS_DATASETS  # noqa: E402
from data.synthetic import (FOLDER_CLASSES, make_dg_root, make_fgfs_root, make_folder_root,  # noqa: E402
                            make_vtab_root)


#: Images per task (VTAB) or per class (your own data) when --n_train / --n_val / --n_test are left out.
DEFAULT_COUNTS = {"vtab": (800, 200, 500), "folder": (8, 0, 4)}


def _write(a: argparse.Namespace) -> None:
    n_train, n_val, n_test = (given if given is not None else default for given, default in
                              zip((a.n_train, a.n_val, a.n_test), DEFAULT_COUNTS.get(a.benchmark, (0, 0, 0))))
    if a.benchmark == "vtab":
        make_vtab_root(a.root, tasks=tuple(a.tasks or ("cifar_100",)), n_train=n_train, n_val=n_val,
                       n_test=n_test, img_size=a.img_size, seed=a.seed, kind=a.kind)
    elif a.benchmark == "few_shot":
        make_fgfs_root(a.root, datasets=tuple(a.tasks or FGFS_DATASETS), classes_per_dataset=a.classes,
                       img_size=a.img_size, seed=a.seed, kind=a.kind)
    elif a.benchmark == "dg":
        make_dg_root(a.root, targets=tuple(a.tasks or DG_TARGETS), classes=a.classes, img_size=a.img_size,
                     seed=a.seed, kind=a.kind)
    else:  # your own data: FOLDER_CLASSES' names (spaces, unicode), then class_<i>
        classes = [*FOLDER_CLASSES, *(f"class_{i}" for i in range(len(FOLDER_CLASSES), a.classes))][:a.classes]
        index_labels = a.layout == "txt"  # a .txt label has no spaces: indices, with classes.txt fixing the order
        make_folder_root(a.root, classes, layout=a.layout, n_train=n_train, n_val=n_val, n_test=n_test,
                         names=not index_labels, classes_file=index_labels, img_size=a.img_size, seed=a.seed)


def main(argv=None) -> int:
    """Write a generated data root (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("benchmark", choices=("vtab", "few_shot", "dg", "folder"),
                   help="the layout: a benchmark's, or 'folder' (your own data: train/ val/ test/ class folders)")
    p.add_argument("root")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="VTAB tasks / few-shot datasets / DG targets (default: cifar_100 / all five / all five)")
    p.add_argument("--n_train", type=int, default=None,
                   help="VTAB: train800 images per task (default 800); folder: per class (default 8)")
    p.add_argument("--n_val", type=int, default=None,
                   help="VTAB: val200 images per task (default 200); folder: per class (default 0: no val split)")
    p.add_argument("--n_test", type=int, default=None,
                   help="VTAB: test images per task (default 500); folder: per class (default 4)")
    p.add_argument("--classes", type=int, default=4, help="few_shot / dg / folder: classes per dataset (default 4)")
    p.add_argument("--layout", choices=("folders", "txt", "csv"), default="folders",
                   help="folder: class folders only, or also train/val/test list files (.txt: index labels and "
                        "classes.txt; .csv: class-name labels)")
    p.add_argument("--img_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=("shapes", "noise"), default="shapes", help="vtab / few_shot / dg")
    a = p.parse_args(argv)
    _write(a)
    print(f"wrote a synthetic {a.benchmark} root at {a.root}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
