#!/usr/bin/env python3
"""Write a small generated data root in the real on-disk layout of a benchmark, to try things out.

    python tools/make_synthetic_data.py vtab /tmp/vtab --tasks cifar_100 dsprites_loc
    python tools/make_synthetic_data.py few_shot /tmp/fgfs --classes 4
    python tools/make_synthetic_data.py dg /tmp/dg --tasks imagenet-sketch

The images are learnable procedural scenes (or noise with ``--kind noise``) written by ``data/synthetic.py``; the
tests and the demo use the same generators.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.domain_generalization import DG_TARGETS  # noqa: E402
from data.few_shot import FGFS_DATASETS  # noqa: E402
from data.synthetic import make_dg_root, make_fgfs_root, make_vtab_root  # noqa: E402


def main(argv=None) -> int:
    """Write a generated data root (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("benchmark", choices=("vtab", "few_shot", "dg"))
    p.add_argument("root")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="VTAB tasks / few-shot datasets / DG targets (default: cifar_100 / all five / all five)")
    p.add_argument("--n_train", type=int, default=800, help="VTAB: train800 images per task (default 800)")
    p.add_argument("--n_val", type=int, default=200, help="VTAB: val200 images per task (default 200)")
    p.add_argument("--n_test", type=int, default=500, help="VTAB: test images per task (default 500)")
    p.add_argument("--classes", type=int, default=4, help="few_shot / dg: classes used per dataset (default 4)")
    p.add_argument("--img_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=("shapes", "noise"), default="shapes")
    a = p.parse_args(argv)
    if a.benchmark == "vtab":
        make_vtab_root(a.root, tasks=tuple(a.tasks or ("cifar_100",)), n_train=a.n_train, n_val=a.n_val,
                       n_test=a.n_test, img_size=a.img_size, seed=a.seed, kind=a.kind)
    elif a.benchmark == "few_shot":
        make_fgfs_root(a.root, datasets=tuple(a.tasks or FGFS_DATASETS), classes_per_dataset=a.classes,
                       img_size=a.img_size, seed=a.seed, kind=a.kind)
    else:
        make_dg_root(a.root, targets=tuple(a.tasks or DG_TARGETS), classes=a.classes, img_size=a.img_size,
                     seed=a.seed, kind=a.kind)
    print(f"wrote a synthetic {a.benchmark} root at {a.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
