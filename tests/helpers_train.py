"""Shared pieces of the train.py tests: generated data roots (built once per test session), tiny-run flags,
a simulated kill after a given epoch, and readers for the run folder's files."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_ROOTS: Dict[str, str] = {}

# vit_tiny at 32 px: 4 patches, 12 blocks of width 192 -- a few ms per step on one CPU thread.
TINY = ["--model", "vit_tiny_patch16_224", "--img_size", "32", "--num_workers", "0", "--batch_size_test", "16"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread; on a busy machine two threads can be 30x slower (spin-waits).
    Import this fixture into a test module to run it with ``torch.set_num_threads(1)``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _root(factory, key: str, build):
    if key not in _ROOTS:
        _ROOTS[key] = build(str(factory.mktemp(key)))
    return _ROOTS[key]


def vtab_root(factory) -> str:
    """cifar_100 (100 classes) and dsprites_loc (16): 24 + 8 training images, 23 test images (odd on purpose)."""
    from data.synthetic import make_vtab_root

    return _root(factory, "vtab", lambda d: make_vtab_root(d, tasks=("cifar_100", "dsprites_loc"), n_train=24,
                                                            n_val=8, n_test=23, img_size=32, seed=0))


def fgfs_root(factory) -> str:
    from data.synthetic import make_fgfs_root

    return _root(factory, "fgfs", lambda d: make_fgfs_root(d, datasets=("food101", "oxford-pets"), shots=(1, 2),
                                                            seeds=(0, 1, 2), classes_per_dataset=4, img_size=32))


def dg_root(factory) -> str:
    from data.synthetic import make_dg_root

    return _root(factory, "dg", lambda d: make_dg_root(d, classes=4, shot=2, n_target_per_class=2, img_size=32))


def copy_root(src: str, dst: Path) -> str:
    """A private copy of a generated root (for tests that damage it)."""
    shutil.copytree(src, dst)
    return str(dst)


class Killed(BaseException):
    """Raised by :func:`kill_after` to stop a run the way a kill would (after last.pth is on disk)."""


@contextlib.contextmanager
def kill_after(seed_index: int, epoch: int):
    """Stop ``train.main`` right after it wrote last.pth for ``epoch`` (1-based) of seed ``seed_index``."""
    from engine.run_folder import RunFolder

    orig = RunFolder.save_resume

    def patched(self, state):
        orig(self, state)
        if state.trainer is not None and state.seed_index == seed_index and state.epoch == epoch:
            raise Killed(f"killed after seed {state.seed_index} epoch {state.epoch}")

    RunFolder.save_resume = patched
    try:
        yield
    finally:
        RunFolder.save_resume = orig


def run_train(argv: List[str]) -> int:
    import train

    return train.main([str(a) for a in argv])


def read_summary(run_dir) -> List[Dict[str, str]]:
    with open(os.path.join(run_dir, "summary.csv"), newline="") as f:
        return list(csv.DictReader(f))


def read_results(run_dir) -> dict:
    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f)


def load_delta(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def result_files(run_dir) -> List[str]:
    """Files that could be mistaken for a result: results.json and delta checkpoints."""
    if not os.path.isdir(run_dir):
        return []
    out = []
    for dirpath, _, names in os.walk(run_dir):
        out += [os.path.join(dirpath, n) for n in names if n == "results.json" or ("delta" in n and "partial" not in dirpath)]
    return out


TIMING_COLUMNS = ("seconds", "images_per_s")


def strip_timing(rows: List[Dict[str, str]]) -> List[Dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


def count_lines(path: str) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def first(iterable, default: Optional[object] = None):
    return next(iter(iterable), default)
