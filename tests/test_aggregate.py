"""tools/aggregate.py on hand-made results.json files: table arithmetic, labels, CSV, the few-shot plot."""
import csv
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO
from data.few_shot import FGFS_DATASETS
from data.vtab import VTAB_GROUPS, VTAB_TASKS
from tools.aggregate import collect, main

BB = "vit_base_patch16_224_in21k"


def _w(root, rel, **res):
    d = os.path.join(str(root), rel)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(res, f)
    return os.path.join(d, "results.json")


def _vtab(root, method, task, top1, seed=42, name=None):
    return _w(root, f"vtab/{task}/{method}/s{seed}", benchmark="vtab", dataset=name or task, backbone=BB,
              method=method, top1=top1, per_seed=[{"seed": seed, "top1": top1, "best_val": None, "best_epoch": None}])


def _md_row(md, *labels):
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[: len(labels)] == list(labels):
            return cells
    raise AssertionError(f"no row {labels} in\n{md}")


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_vtab_means_by_hand(tmp_path, capsys):
    # Natural 7 tasks: 70..76 -> mean 73; Specialized 4 tasks: 80, 82, 84, 86 -> 83;
    # Structured 8 tasks: 50..57 -> 53.5. Mean of group means = (73 + 83 + 53.5) / 3 = 69.8333;
    # 19-task mean = (7*73 + 4*83 + 8*53.5) / 19 = 1267 / 19 = 66.6842.
    vals = {}
    for i, t in enumerate(VTAB_GROUPS["natural"]):
        vals[t] = 70 + i
    for i, t in enumerate(VTAB_GROUPS["specialized"]):
        vals[t] = 80 + 2 * i
    for i, t in enumerate(VTAB_GROUPS["structured"]):
        vals[t] = 50 + i
    for t, v in vals.items():
        _vtab(tmp_path, "dtl", t, v, name=VTAB_TASKS[t].folder if t == "cifar_100" else None)  # folder alias
    # cifar_100 with two more seeds: 70, 72, 74 -> mean 72, sample std 2 (replaces 70 -> natural mean 73.2857)
    _vtab(tmp_path, "dtl", "cifar_100", 72, seed=1)
    _vtab(tmp_path, "dtl", "cifar_100", 74, seed=2)
    # dtl+ on two tasks only: partial means, marked
    _vtab(tmp_path, "dtl+", "dtd", 60.0)
    _vtab(tmp_path, "dtl+", "eurosat", 90.0)
    out_md = tmp_path / "tables" / "res.md"
    rc = main([str(tmp_path), "--out", str(out_md), "--fig_dir", str(tmp_path / "figs"), "--decimals", "2"])
    md = capsys.readouterr().out
    assert rc == 0
    nat = (72 + sum(range(71, 77))) / 7
    groups = (nat + 83 + 53.5) / 3
    all19 = (nat * 7 + 83 * 4 + 53.5 * 8) / 19
    row = _md_row(md, BB, "dtl")
    header = _md_row(md, "Backbone", "Method")
    cell = dict(zip(header, row))
    assert cell["cifar_100"] == "72.00 ± 2.00"
    assert cell["**Natural**"] == f"{nat:.2f}" and cell["**Specialized**"] == "83.00" and cell["**Structured**"] == "53.50"
    assert cell["**Mean (groups)**"] == f"{groups:.2f}" and cell["**Mean (19 tasks)**"] == f"{all19:.2f}"
    assert cell["Tasks"] == "19/19"
    assert header[2:9] == list(VTAB_GROUPS["natural"])  # the benchmark's order, grouped
    assert "mean of the three group means" in md and "plain mean over the 19 tasks" in md
    plus = dict(zip(header, _md_row(md, BB, "dtl+")))
    assert plus["dtd"] == "60.00" and plus["cifar_100"] == "–" and plus["**Natural**"] == "60.00†"
    assert plus["**Mean (groups)**"] == "75.00†" and plus["**Mean (19 tasks)**"] == "75.00†" and plus["Tasks"] == "2/19"
    assert "† partial" in md
    # files: Markdown at --out, CSVs next to it; no temporary files left behind
    assert out_md.read_text(encoding="utf-8") == md
    rows = _read_csv(tmp_path / "tables" / "res_vtab_summary.csv")
    assert rows[0]["method"] == "dtl" and float(rows[0]["mean_of_group_means"]) == pytest.approx(groups, abs=1e-4)
    assert float(rows[0]["mean_19_tasks"]) == pytest.approx(all19, abs=1e-4) and rows[0]["partial"] == ""
    assert rows[1]["partial"] == "natural;specialized;mean_of_group_means;mean_19_tasks"
    full = _read_csv(tmp_path / "tables" / "res_vtab.csv")
    assert float(full[0]["cifar_100"]) == 72.0 and full[1]["cifar_100"] == ""
    long = {(r["method"], r["dataset"]): r for r in _read_csv(tmp_path / "tables" / "res_long.csv")}
    assert long[("dtl", "cifar_100")]["n"] == "3" and float(long[("dtl", "cifar_100")]["std"]) == 2.0
    assert sorted(os.listdir(tmp_path / "tables")) == ["res.md", "res_long.csv", "res_vtab.csv", "res_vtab_summary.csv"]
    assert not (tmp_path / "figs").exists()  # no few-shot results, no plot


def test_few_shot_table_and_plot(tmp_path, capsys):
    for d in ("food101", "oxford-pets"):
        for k in (1, 2, 4, 8, 16):
            for m, off in (("dtl", 0.0), ("dtl+", 1.0)):
                per = [{"seed": s, "top1": 10 * k ** 0.5 + off + s, "best_val": 50.0, "best_epoch": 10} for s in (0, 1, 2)]
                _w(tmp_path, f"fs/{d}/{m}/shot{k}", benchmark="few_shot", dataset=f"{d}-FS", backbone=BB, method=m,
                   shot=k, top1=sum(p["top1"] for p in per) / 3, top1_std=1.0, per_seed=per)
    figs = tmp_path / "figs"
    rc = main([str(tmp_path), "--fig_dir", str(figs)])
    md = capsys.readouterr().out
    assert rc == 0
    header = _md_row(md, "Backbone", "Method", "Dataset")
    assert header[3:] == ["1-shot", "2-shot", "4-shot", "8-shot", "16-shot"]
    row = dict(zip(header, _md_row(md, BB, "dtl", "food101")))
    assert row["1-shot"] == "11.0 ± 1.0" and row["16-shot"] == "41.0 ± 1.0"
    avg = dict(zip(header, _md_row(md, BB, "dtl+", "**average**")))
    assert avg["4-shot"] == "22.0†"  # 2 of 5 datasets: partial
    png = figs / "few_shot_curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert os.path.isfile(tmp_path / "aggregate.md") and os.path.isfile(tmp_path / "aggregate_few_shot.csv")
    rows = _read_csv(tmp_path / "aggregate_few_shot.csv")
    assert [r["dataset"] for r in rows] == ["food101", "oxford-pets", "average"] * 2
    assert float(rows[0]["shot_4"]) == pytest.approx(21.0)
    assert set(FGFS_DATASETS) >= {"food101", "oxford-pets"}


def test_dg_table_single_and_multi_target_runs(tmp_path, capsys):
    for t, base in (("imagenet", 70.0), ("imagenet-sketch", 40.0), ("imagenetv2", 60.0)):
        _w(tmp_path, f"dg/{t}", benchmark="domain_generalization", dataset=t, target=t, source="imagenet-16shot",
           backbone=BB, method="dtl", top1=base + 1, per_seed=[{"seed": s, "top1": base + s} for s in (0, 1, 2)])
    _w(tmp_path, "dg/all", benchmark="domain_generalization", dataset="imagenet",
       target=["imagenet", "imagenet-adversarial", "imagenet-rendition"], backbone=BB, method="dtl+", top1=0.0,
       per_seed=[{"seed": s, "top1": 71.0, "targets": {"imagenet": 71.0, "imagenet-adversarial": 20.0 + s,
                                                       "imagenet-rendition": 30.0}} for s in (0, 1, 2)])
    rc = main([str(tmp_path), "--fig_dir", str(tmp_path / "f")])
    md = capsys.readouterr().out
    assert rc == 0
    header = _md_row(md, "Backbone", "Method")
    assert header[2:] == ["ImageNet (source)", "-V2", "-Sketch", "-A", "-R", "Mean (4 targets)"]
    dtl = dict(zip(header, _md_row(md, BB, "dtl")))
    assert dtl["ImageNet (source)"] == "71.0 ± 1.0" and dtl["-Sketch"] == "41.0 ± 1.0" and dtl["-A"] == "–"
    assert dtl["Mean (4 targets)"] == "51.0†"
    plus = dict(zip(header, _md_row(md, BB, "dtl+")))
    assert plus["-A"] == "21.0 ± 1.0" and plus["-R"] == "30.0 ± 0.0" and plus["Mean (4 targets)"] == "25.5†"


def test_duplicate_seed_newest_wins_and_unknown_results_kept(tmp_path, capsys):
    old = _vtab(tmp_path / "a", "dtl", "dtd", 50.0)
    new = _vtab(tmp_path / "b", "dtl", "dtd", 60.0)
    t = time.time()
    os.utime(old, (t - 100, t - 100))
    os.utime(new, (t, t))
    _w(tmp_path, "c", benchmark="vtab", dataset="mnist", backbone="tiny", method="linear", top1=99.0)
    col = collect(str(tmp_path))
    cell = col.cells[("vtab", BB, "dtl", "dtd", None)]
    assert cell.values == [60.0] and any("using the newer" in n and "seed 42" in n for n in col.notes)
    rc = main([str(tmp_path), "--fig_dir", str(tmp_path / "f")])
    captured = capsys.readouterr()
    assert rc == 0 and "Other results" in captured.out and "| vtab | mnist | tiny | linear | 99.0 |" in captured.out
    assert "using the newer" in captured.err


def test_bad_results_file(tmp_path, capsys):
    _vtab(tmp_path, "dtl", "dtd", 50.0)
    bad = os.path.join(tmp_path, "broken", "results.json")
    os.makedirs(os.path.dirname(bad))
    with open(bad, "w") as f:
        f.write('{"benchmark": "vtab", "dataset": ')
    rc = main([str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and bad in err and "--skip_bad" in err
    assert not os.path.exists(os.path.join(tmp_path, "aggregate.md"))
    rc = main([str(tmp_path), "--skip_bad", "--format", "csv", "--fig_dir", str(tmp_path / "f")])
    cap = capsys.readouterr()
    assert rc == 0 and "skipped" in cap.err and "backbone,method,natural" in cap.out
    _w(tmp_path, "nofield", benchmark="vtab", dataset="dtd", method="dtl")
    rc = main([str(tmp_path), "--skip_bad"])
    assert rc == 0 and "missing field(s) top1" in capsys.readouterr().err
    rc = main([str(tmp_path / "nope")])
    assert rc == 2 and "output folder not found" in capsys.readouterr().err


def test_cli_runs_as_a_script(tmp_path):
    _vtab(tmp_path, "dtl", "svhn", 88.0)
    p = subprocess.run([sys.executable, str(REPO / "tools" / "aggregate.py"), str(tmp_path), "--fig_dir",
                        str(tmp_path / "f")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "| 88.0 |" in p.stdout, p.stdout + p.stderr


def test_failed_write_is_exit_1_naming_the_file(tmp_path, capsys):
    _vtab(tmp_path, "dtl", "dtd", 50.0)
    (tmp_path / "blocker").write_text("x")
    out_md = tmp_path / "blocker" / "table.md"
    rc = main([str(tmp_path), "--out", str(out_md), "--fig_dir", str(tmp_path / "figs")])
    assert rc == 1
    assert capsys.readouterr().err.startswith(f"error: could not write {out_md}: ")  # the folder is a file
    assert (tmp_path / "blocker").read_text() == "x"
