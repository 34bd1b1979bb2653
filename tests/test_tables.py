"""engine/tables.py: a registered fourth benchmark gets its table from its description alone (the default
layout and a declared one), runs that skipped images are marked in Markdown and CSV, the few-shot and DG tables
print as before the layouts, and the module needs no torch."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys

import pytest

import data.benchmarks as registry
from conftest import REPO
from data.benchmark import TableLayout
from data.vtab import BENCHMARK as VTAB
from engine.tables import skipped_images
from tools.aggregate import main

BB = "vit_tiny_patch16_224"


def _known(name: str) -> str:
    key = name.strip().lower()
    if not key.startswith("pet-"):
        raise ValueError(f"unknown pet dataset {name!r}")
    return key


PETS = dataclasses.replace(VTAB, name="pets_bench", title="Pet photos", aliases=(), table="pets",
                           canonical_dataset=_known, dataset_names=("pet-dogs", "pet-cats"),
                           table_layout=TableLayout())


@pytest.fixture
def register(monkeypatch):
    def add(bench):
        monkeypatch.setitem(registry.REGISTRY, bench.name, bench)
        monkeypatch.setitem(registry._ALIASES, bench.name, bench.name)
    return add


def _w(root, rel, **res):
    d = os.path.join(str(root), rel)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(res, f)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_a_fourth_benchmark_gets_the_default_table(tmp_path, capsys, register):
    register(PETS)
    for ds, m, v in (("pet-cats", "dtl", 80.0), ("pet-dogs", "dtl", 70.0), ("pet-dogs", "linear", 50.0),
                     ("pet-zebras", "dtl+", 60.0)):
        _w(tmp_path, f"{ds}/{m}", benchmark="pets_bench", dataset=ds, backbone=BB, method=m, top1=v,
           per_seed=[{"seed": 0, "top1": v}])
    assert main([str(tmp_path), "--fig_dir", str(tmp_path / "f")]) == 0
    md = capsys.readouterr().out
    table = md[md.index("### Pet photos (top-1 %)"):]
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == "| Backbone | Dataset | dtl | dtl+ | linear |"
    assert lines[1] == "|---|---|---:|---:|---:|"
    # rows in the benchmark's order (dogs before cats), then a dataset it does not list
    assert lines[2:] == [f"| {BB} | pet-dogs | 70.0 | – | 50.0 |", f"| {BB} | pet-cats | 80.0 | – | – |",
                         f"| {BB} | pet-zebras | – | 60.0 | – |"]
    assert "Other results" not in md
    rows = _rows(tmp_path / "aggregate_pets.csv")
    assert rows[0] == ["backbone", "dataset", "dtl", "dtl+", "linear", "partial"]
    assert rows[1] == [BB, "pet-dogs", "70.0", "", "50.0", ""]


def test_a_fourth_benchmark_with_a_grouped_layout(tmp_path, capsys, register):
    layout = TableLayout(title="Pets, grouped", columns="datasets", item="pets",
                         groups=(("big", "Big", ("pet-dogs",)), ("small", "Small", ("pet-cats", "pet-mice"))))
    register(dataclasses.replace(PETS, dataset_names=("pet-dogs", "pet-cats", "pet-mice"), table_layout=layout))
    for ds, v in (("pet-dogs", 70.0), ("pet-cats", 80.0), ("pet-mice", 90.0)):
        _w(tmp_path, ds, benchmark="pets_bench", dataset=ds, backbone=BB, method="dtl", top1=v)
    _w(tmp_path, "plus", benchmark="pets_bench", dataset="pet-cats", backbone=BB, method="dtl+", top1=60.0)
    assert main([str(tmp_path), "--fig_dir", str(tmp_path / "f")]) == 0
    md = capsys.readouterr().out
    assert "### Pets, grouped" in md and "### Pet photos summary" in md
    assert f"| {BB} | dtl | 70.0 | 70.0 | 80.0 | 90.0 | 85.0 | 77.5 | 80.0 | 3/3 |" in md
    assert f"| {BB} | dtl+ | – | – | 60.0 | – | 60.0† | 60.0† | 60.0† | 1/3 |" in md
    assert "| Backbone | Method | Big | Small | Mean (groups) | Mean (3 pets) | Pets |" in md
    assert _rows(tmp_path / "aggregate_pets_summary.csv")[0] == [
        "backbone", "method", "big", "small", "mean_of_group_means", "mean_3_pets", "n_pets", "partial"]


def test_skipped_images_are_marked_everywhere(tmp_path, capsys):
    _w(tmp_path, "a", benchmark="vtab", dataset="dtd", backbone=BB, method="dtl", top1=50.0, skipped_images=6)
    _w(tmp_path, "b", benchmark="vtab", dataset="svhn", backbone=BB, method="dtl", top1=70.0, skipped_images=0)
    _w(tmp_path, "c", benchmark="vtab", dataset="svhn", backbone=BB, method="dtl+", top1=72.0)
    assert main([str(tmp_path), "--fig_dir", str(tmp_path / "f")]) == 0
    md = capsys.readouterr().out
    header = next(line for line in md.splitlines() if line.startswith("| Backbone | Method | cifar_100"))
    cells = dict(zip(header.split("|"), next(line for line in md.splitlines()
                                            if line.startswith(f"| {BB} | dtl |")).split("|")))
    assert cells[" dtd "] == " 50.0‡ " and cells[" svhn "] == " 70.0 "
    assert cells[" **Natural** "] == " 60.0†‡ "  # the mean it enters carries the mark
    plus = next(line for line in md.splitlines() if line.startswith(f"| {BB} | dtl+ |"))
    assert "‡" not in plus
    assert md.count("‡ images skipped: the run dropped unreadable images") == 2  # full table and summary
    rows = {r[1]: r for r in _rows(tmp_path / "aggregate_vtab.csv")}
    assert "dtd:images_skipped" in rows["dtl"][-1].split(";") and "svhn:images_skipped" not in rows["dtl"][-1]
    assert rows["dtl+"][-1] == "mean_natural;mean_of_group_means;mean_19_tasks"


def test_tables_import_no_torch():
    code = ("import sys; sys.path.insert(0, 'tools'); import engine.tables, aggregate; "
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# Printed by tools/aggregate.py before the tables were built from the benchmarks' layouts (the same files).
GOLDEN = """\
### Few-shot fine-grained (top-1 %)

| Backbone | Method | Dataset | 1-shot | 2-shot | 4-shot | 8-shot | 16-shot |
|---|---|---|---:|---:|---:|---:|---:|
| bb | dtl | food101 | – | 30.0 | – | – | – |
| bb | dtl | oxford-pets | – | 50.0 | – | – | – |
| bb | dtl | **average** | – | 40.0† | – | – | – |
| bb | dtl+ | oxford-pets | – | – | – | 60.0 ± 1.4 | – |
| bb | dtl+ | **average** | – | – | – | 60.0† | – |

Cells: top-1 % on test_meta.list with the best-validation weights, mean ± sample std over seeds.  
† partial: average over the datasets present only (of 5).

### Domain generalisation (top-1 %)

| Backbone | Method | ImageNet (source) | -V2 | -Sketch | -A | -R | Mean (4 targets) |
|---|---|---:|---:|---:|---:|---:|---:|
| bb | dtl | 70.0 | – | 41.0 ± 1.0 | – | – | 41.0† |

Source: ImageNet 16-shot. Cells: top-1 % (1000-way), mean ± sample std over seeds.  
† partial: mean over the targets present only.
"""


def test_few_shot_and_dg_tables_are_unchanged(tmp_path, capsys):
    _w(tmp_path, "d1", benchmark="dg", dataset="imagenet-sketch", backbone="bb", method="dtl", top1=40.0,
       per_seed=[{"seed": s, "top1": 40.0 + s} for s in range(3)])
    _w(tmp_path, "d2", benchmark="dg", dataset="imagenet", backbone="bb", method="dtl", top1=70.0)
    _w(tmp_path, "f1", benchmark="few_shot", dataset="food101", backbone="bb", method="dtl", shot=2, top1=30.0)
    _w(tmp_path, "f2", benchmark="few_shot", dataset="oxford-pets", backbone="bb", method="dtl+", shot=8, top1=60.0,
       per_seed=[{"seed": 0, "top1": 59.0}, {"seed": 1, "top1": 61.0}])
    _w(tmp_path, "f3", benchmark="few_shot", dataset="oxford-pets", backbone="bb", method="dtl", shot=2, top1=50.0)
    assert main([str(tmp_path), "--fig_dir", str(tmp_path / "f")]) == 0
    md = capsys.readouterr().out
    assert md == f"## Results under {tmp_path} (5 results.json file(s))\n\n" + GOLDEN


def test_your_own_data_gets_its_table(tmp_path, capsys):
    """The registered `folder` benchmark (any dataset name) has a table of its own, no edit in tools/."""
    for ds, m, v in (("my plants", "dtl", 91.5), ("my plants", "dtl+", 92.3), ("Fabrik-Teile", "dtl", 77.0)):
        _w(tmp_path, f"{ds}/{m}", benchmark="folder", dataset=ds, backbone=BB, method=m, top1=v,
           per_seed=[{"seed": 0, "top1": v}])
    assert main([str(tmp_path), "--fig_dir", str(tmp_path / "f")]) == 0
    md = capsys.readouterr().out
    assert "No results found" not in md
    table = md[md.index("### your own data (top-1 %)"):]
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == "| Backbone | Dataset | dtl | dtl+ |"
    assert sorted(lines[2:4]) == sorted([f"| {BB} | my plants | 91.5 | 92.3 |", f"| {BB} | Fabrik-Teile | 77.0 | – |"])


@pytest.mark.parametrize("value, n", [(6, 6), (0, 0), (None, 0), (True, 0), ("6", 0), (-1, 0)])
def test_skipped_images_reads_only_a_positive_count(value, n):
    assert skipped_images({"skipped_images": value} if value is not None else {}) == n
