#!/usr/bin/env python3
"""Collect every ``results.json`` under OUTPUT_ROOT into the papers' tables (Markdown + CSV) and a plot.

    python tools/aggregate.py output/                       # print Markdown, write output/aggregate*.{md,csv}
    python tools/aggregate.py output/ --out tables/results.md --fig_dir figs
    python tools/aggregate.py output/ --format csv          # print the CSV tables instead

Tables (one row per backbone + method):
* VTAB-1k: the 19 tasks in the benchmark's order grouped Natural / Specialized / Structured, each group's mean, the mean of
  the three group means ("Mean (groups)", the paper's number) and the plain 19-task mean ("Mean (19 tasks)").
  A mean over an incomplete group is marked ``†`` (partial: mean of the tasks present); ``-`` = missing.
* Few-shot: dataset x shots (1, 2, 4, 8, 16).
* Domain generalisation: ImageNet (source domain) and the four targets, plus the mean of the four targets.
A cell is the mean over seeds, ``± std`` (sample standard deviation, n - 1) when there are several seeds.
Per-seed values come from ``per_seed`` (else ``top1`` with ``seed``); a seed found in several result files of
the same cell counts once (the newest file wins, noted on stderr). Results of unknown benchmarks or datasets
are listed in an "Other results" table, never dropped silently.

``--paper`` puts the published number and our difference beside each VTAB-1k cell that has one (ViT-B/16
ImageNet-21k rows only, the paper's backbone): ``70.1 (69.6, +0.5)``; they also go to ``<base>_paper.csv``.

Files (written atomically): ``<base>.md``, ``<base>_vtab.csv`` / ``_few_shot.csv`` / ``_dg.csv`` (cell means)
and ``<base>_long.csv`` (one row per cell: n, mean, std, seeds, files), where ``<base>`` is ``--out`` without
its extension, or ``OUTPUT_ROOT/aggregate``. The few-shot curves (accuracy against shots, one subplot per
dataset, one line per method) go to ``<fig_dir>/few_shot_curves.png`` (default ``figs/``).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

from data.domain_generalization import DG_TARGETS  # noqa: E402
from data.few_shot import FGFS_DATASETS, FGFS_SHOTS  # noqa: E402
from data.benchmarks import canonical_benchmark, get_benchmark  # noqa: E402
from data.vtab import VTAB_GROUPS  # noqa: E402
from utils.atomic import atomic_write_bytes  # noqa: E402

METHOD_ORDER = ("dtl", "dtl+")
GROUP_LABELS = {"natural": "Natural", "specialized": "Specialized", "structured": "Structured"}
DG_LABELS = {"imagenet": "ImageNet (source)", "imagenetv2": "-V2", "imagenet-sketch": "-Sketch",
             "imagenet-adversarial": "-A", "imagenet-rendition": "-R"}
DASH = "–"
PARTIAL = "†"  # marks a mean over an incomplete set (no Markdown meaning, unlike *)


# --------------------------------------------------------------------------------------- published numbers
# The paper's numbers live where the repository already keeps them: the per-task DTL numbers in
# tools/make_launchers.py (written into the launchers' "Paper (...)" header lines) and the VTAB-1k means of the
# group means in tools/plot_memory.py (DTL, DTL+ and the baselines, with their sources). They are for the paper's
# backbone only.
PAPER_BACKBONE = "vit_base_patch16_224_in21k"
PAPER_DTL_PRINTED_MEAN = 76.7  # DTL, ViT-B/16, VTAB-1k mean of the group means, as the paper prints it


def paper_vtab_numbers() -> Dict[Tuple[str, str], Tuple[float, str]]:
    """(method, column) -> (published top-1, source); column = a VTAB task or ``mean_of_group_means``."""
    from make_launchers import PAPER_DTL_VIT_VTAB
    from plot_memory import PUBLISHED_VTAB_GROUP_MEAN

    out: Dict[Tuple[str, str], Tuple[float, str]] = {}
    for task, v in PAPER_DTL_VIT_VTAB.items():
        out[("dtl", task)] = (float(v), "DTL paper")
    for method, (v, src) in PUBLISHED_VTAB_GROUP_MEAN.items():
        out[(method, "mean_of_group_means")] = (float(v), src)
    # beside our cells: the number the DTL paper prints (plot_memory plots the mean recomputed from its per-task
    # numbers, 76.76, more precise for a plot)
    out[("dtl", "mean_of_group_means")] = (PAPER_DTL_PRINTED_MEAN, "DTL paper")
    return out


class ResultsError(ValueError):
    """A results.json that cannot be used (names the file)."""


# ----------------------------------------------------------------------------------------------- collection
@dataclass
class Cell:
    """All per-seed accuracies of one (benchmark, backbone, method, dataset, shot) combination."""

    by_seed: Dict[Any, Tuple[float, float, str]] = field(default_factory=dict)  # seed -> (top1, mtime, file)
    unseeded: List[Tuple[float, str]] = field(default_factory=list)

    def add(self, seed, top1: float, mtime: float, path: str, notes: List[str], label: str) -> None:
        if seed is None:
            self.unseeded.append((top1, path))
            return
        old = self.by_seed.get(seed)
        if old is not None:
            keep_new = mtime >= old[1]
            kept, dropped = (path, old[2]) if keep_new else (old[2], path)
            notes.append(f"{label}, seed {seed}: found in {dropped} and {kept}; using the newer {kept}")
            if not keep_new:
                return
        self.by_seed[seed] = (top1, mtime, path)

    @property
    def values(self) -> List[float]:
        seeded = [v[0] for _, v in sorted(self.by_seed.items(), key=lambda kv: str(kv[0]))]
        return seeded + [v for v, _ in self.unseeded]

    @property
    def seeds(self) -> List[Any]:
        return sorted(self.by_seed, key=str)

    @property
    def files(self) -> List[str]:
        return sorted({v[2] for v in self.by_seed.values()} | {p for _, p in self.unseeded})

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> Optional[float]:
        v = self.values
        return sum(v) / len(v) if v else None

    @property
    def std(self) -> Optional[float]:
        v = self.values
        if len(v) < 2:
            return None
        m = sum(v) / len(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


Key = Tuple[str, str, str, str, Optional[int]]  # benchmark, backbone, method, dataset, shot


@dataclass
class Collection:
    cells: Dict[Key, Cell] = field(default_factory=lambda: defaultdict(Cell))
    notes: List[str] = field(default_factory=list)
    n_files: int = 0

    def add(self, key: Key, seed, top1, mtime: float, path: str) -> None:
        label = "/".join(str(k) for k in key if k is not None)
        self.cells[key].add(seed, float(top1), mtime, path, self.notes, label)


def find_results(root: str) -> List[str]:
    """Every ``results.json`` below ``root`` (sorted)."""
    if not os.path.isdir(root):
        raise ResultsError(f"{root}: output folder not found")
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        if "results.json" in files:
            out.append(os.path.join(d, "results.json"))
    return out


def _canon_dataset(bench: str, name: str) -> Tuple[str, bool]:
    """The canonical dataset name of a known benchmark, and whether both are known."""
    try:
        return get_benchmark(bench).canonical_dataset(name), True
    except ValueError:
        return name, False


def _seed_of(res: Dict[str, Any]):
    if res.get("seed") is not None:
        return res["seed"]
    args = res.get("args") or {}
    if isinstance(args, dict):
        if args.get("seed") is not None:
            return args["seed"]
    return None


def _num(x, path: str, what: str) -> float:
    """A top-1 accuracy in percent: a finite number in [0, 100], else :class:`ResultsError` naming the file."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        raise ResultsError(f"{path}: {what} must be a finite number, got {x!r}")
    if not 0.0 <= float(x) <= 100.0:
        raise ResultsError(f"{path}: {what} = {x!r} is not a top-1 accuracy in percent (outside [0, 100])")
    return float(x)


def add_results_file(col: Collection, path: str) -> None:
    """Add one results.json to the collection; :class:`ResultsError` naming the file when it is unusable. Every
    value of the file is checked before any is added, so a skipped file (``--skip_bad``) leaves nothing behind."""
    pending: List[Tuple[Key, Any, float]] = []
    _read_results_file(pending, path)
    mtime = os.path.getmtime(path)
    col.n_files += 1
    for key, seed, top1 in pending:
        col.add(key, seed, top1, mtime, path)


def _read_results_file(pending: List[Tuple[Key, Any, float]], path: str) -> None:
    """The (cell key, seed, top-1) values of one results.json, appended to ``pending``."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            res = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path}: cannot read results ({e})") from None
    if not isinstance(res, dict):
        raise ResultsError(f"{path}: expected a JSON object")
    missing = [k for k in ("benchmark", "dataset", "method", "top1") if k not in res]
    if missing:
        raise ResultsError(f"{path}: missing field(s) {', '.join(missing)}")
    if res["top1"] is not None:
        _num(res["top1"], path, "top1")
    raw_bench = str(res["benchmark"])
    try:
        bench = canonical_benchmark(raw_bench)
    except ValueError:
        bench = raw_bench
    backbone = str(res.get("backbone") or "?")
    method = str(res["method"])
    dataset, known = _canon_dataset(bench, str(res["dataset"]))
    shot = res.get("shot")
    if bench == "few_shot":
        if shot is None and isinstance(res.get("args"), dict):
            shot = res["args"].get("shot")
        if shot is None:
            raise ResultsError(f"{path}: few-shot result without 'shot'")
        shot = int(shot)
    else:
        shot = None
    if not known:
        bench_key = "other:" + bench
    else:
        bench_key = bench
    per_seed = res.get("per_seed") or []

    if bench_key == "domain_generalization":
        # One run may evaluate several targets (per_seed[i]['targets'] / per_target).
        tgt = res.get("target")
        targets = tgt if isinstance(tgt, list) else [tgt if isinstance(tgt, str) and tgt else dataset]
        targets = [_canon_dataset(bench, t)[0] for t in targets]
        if per_seed and all(isinstance(s, dict) and isinstance(s.get("targets"), dict) for s in per_seed):
            for s in per_seed:
                for t, v in s["targets"].items():
                    pending.append(((bench_key, backbone, method, _canon_dataset(bench, t)[0], None),
                                    s.get("seed"), _num(v, path, f"per_seed target {t}")))
            return
        if isinstance(res.get("per_target"), dict) and len(res["per_target"]) > 1:
            for t, v in res["per_target"].items():
                top = v.get("top1") if isinstance(v, dict) else v
                pending.append(((bench_key, backbone, method, _canon_dataset(bench, t)[0], None), None,
                                _num(top, path, f"per_target {t}")))
            return
        dataset = targets[0]
    key = (bench_key, backbone, method, dataset, shot)
    if per_seed:
        for s in per_seed:
            if not isinstance(s, dict) or "top1" not in s:
                raise ResultsError(f"{path}: per_seed entries must be objects with 'seed' and 'top1'")
            pending.append((key, s.get("seed"), _num(s["top1"], path, "per_seed top1")))
    else:
        pending.append((key, _seed_of(res), _num(res["top1"], path, "top1")))


def collect(root: str, skip_bad: bool = False) -> Collection:
    """Collect every results.json below ``root``. Unusable files raise, or are noted and skipped."""
    col = Collection()
    for path in find_results(root):
        try:
            add_results_file(col, path)
        except ResultsError as e:
            if not skip_bad:
                raise
            col.notes.append(f"skipped: {e}")
    return col


# ----------------------------------------------------------------------------------------------- tables
def _rows(col: Collection, bench: str) -> List[Tuple[str, str]]:
    rows = {(k[1], k[2]) for k in col.cells if k[0] == bench}

    def order(r):
        b, m = r
        return (b, METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m)

    return sorted(rows, key=order)


def _mean(vals: Sequence[float]) -> Optional[float]:
    return sum(vals) / len(vals) if vals else None


@dataclass
class Value:
    """A table cell: mean, optional std / n, and whether it is a partial mean."""

    mean: Optional[float]
    std: Optional[float] = None
    n: int = 0
    partial: bool = False
    paper: Optional[float] = None  # the published number for this cell (``--paper``)

    def fmt(self, decimals: int) -> str:
        if self.mean is None:
            return DASH + (f" ({self.paper:.1f})" if self.paper is not None else "")
        s = f"{self.mean:.{decimals}f}"
        if self.std is not None:
            s += f" ± {self.std:.{decimals}f}"
        s += PARTIAL if self.partial else ""
        if self.paper is not None:
            s += f" ({self.paper:.1f}, {self.mean - self.paper:+.{decimals}f})"
        return s


@dataclass
class Table:
    title: str
    header: List[str]
    rows: List[List[Any]]  # str labels then Value cells
    footnotes: List[str] = field(default_factory=list)
    csv_header: Optional[List[str]] = None

    def markdown(self, decimals: int) -> str:
        out = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
               "|" + "|".join("---" if i < self._n_labels() else "---:" for i in range(len(self.header))) + "|"]
        for r in self.rows:
            out.append("| " + " | ".join(c.fmt(decimals) if isinstance(c, Value) else str(c) for c in r) + " |")
        if self.footnotes:
            out.append("")
            out += [f"{f}  " if i < len(self.footnotes) - 1 else f for i, f in enumerate(self.footnotes)]
        return "\n".join(out)

    def _n_labels(self) -> int:
        n = 0
        for c in (self.rows[0] if self.rows else []):
            if isinstance(c, Value):
                break
            n += 1
        return n

    def csv_rows(self) -> List[List[Any]]:
        """Means only (std and n are in the long CSV); a last column names the partial means of the row."""
        header = list(self.csv_header or self.header)
        rows = [header + ["partial"]]
        for r in self.rows:
            partial = [header[i] for i, c in enumerate(r) if isinstance(c, Value) and c.partial]
            rows.append([("" if c.mean is None else round(c.mean, 4)) if isinstance(c, Value) else str(c).strip("*")
                         for c in r] + [";".join(partial)])
        return rows


def _cell_value(cell: Optional[Cell]) -> Value:
    if cell is None or cell.n == 0:
        return Value(None)
    return Value(cell.mean, cell.std, cell.n)


def vtab_tables(col: Collection, paper: bool = False) -> List[Table]:
    """The full VTAB-1k table and a summary table (group means and both overall means); ``paper``: the
    published numbers beside the cells that have one."""
    rows = _rows(col, "vtab")
    published = paper_vtab_numbers() if paper else {}

    def pub(backbone: str, method: str, column: str) -> Optional[float]:
        hit = published.get((method, column)) if backbone == PAPER_BACKBONE else None
        return hit[0] if hit else None

    if not rows:
        return []
    header = ["Backbone", "Method"]
    csv_header = ["backbone", "method"]
    for g, tasks in VTAB_GROUPS.items():
        header += list(tasks) + [f"**{GROUP_LABELS[g]}**"]
        csv_header += list(tasks) + [f"mean_{g}"]
    header += ["**Mean (groups)**", "**Mean (19 tasks)**", "Tasks"]
    csv_header += ["mean_of_group_means", "mean_19_tasks", "n_tasks"]
    full, summary = [], []
    any_partial = False
    for backbone, method in rows:
        line: List[Any] = [backbone, method]
        group_means, all_means = [], []
        complete = True
        sums: Dict[str, Value] = {}
        for g, tasks in VTAB_GROUPS.items():
            means = []
            for t in tasks:
                v = _cell_value(col.cells.get(("vtab", backbone, method, t, None)))
                v.paper = pub(backbone, method, t)
                line.append(v)
                if v.mean is not None:
                    means.append(v.mean)
            part = 0 < len(means) < len(tasks)
            complete &= len(means) == len(tasks)
            gv = Value(_mean(means), partial=part)
            sums[g] = gv
            line.append(gv)
            if gv.mean is not None:
                group_means.append(gv.mean)
            all_means += means
        any_partial |= not complete
        mg = Value(_mean(group_means), partial=not complete and bool(group_means),
                   paper=pub(backbone, method, "mean_of_group_means"))
        m19 = Value(_mean(all_means), partial=not complete and bool(all_means))
        n_tasks = f"{len(all_means)}/19"
        line += [mg, m19, n_tasks]
        full.append(line)
        summary.append([backbone, method, sums["natural"], sums["specialized"], sums["structured"], mg, m19, n_tasks])
    notes = ["Cells: top-1 % on the test split (mean ± sample std over seeds when several). "
             "**Mean (groups)** = mean of the three group means (the paper's VTAB number); "
             "**Mean (19 tasks)** = plain mean over the 19 tasks."]
    if any_partial:
        notes.append(f"{PARTIAL} partial: mean over the tasks present only (not comparable with published means); "
                     f"{DASH} = no result.")
    if any(isinstance(c, Value) and c.paper is not None for r in full for c in r):
        notes.append(f"x (p, d): ours x, the published number p and the difference d = x - p, for {PAPER_BACKBONE} "
                     "rows only: per-task DTL numbers from the DTL paper; means of the group means of DTL, DTL+ "
                     "and the baselines as listed (with sources) in tools/plot_memory.py.")
    s_header = ["Backbone", "Method", "Natural", "Specialized", "Structured", "Mean (groups)", "Mean (19 tasks)",
                "Tasks"]
    return [Table("VTAB-1k (top-1 %)", header, full, notes, csv_header),
            Table("VTAB-1k summary", s_header, summary, notes,
                  ["backbone", "method", "natural", "specialized", "structured", "mean_of_group_means",
                   "mean_19_tasks", "n_tasks"])]


def few_shot_table(col: Collection) -> Optional[Table]:
    rows = _rows(col, "few_shot")
    if not rows:
        return None
    shots = sorted({k[4] for k in col.cells if k[0] == "few_shot"} | set(FGFS_SHOTS))
    header = ["Backbone", "Method", "Dataset"] + [f"{k}-shot" for k in shots]
    csv_header = ["backbone", "method", "dataset"] + [f"shot_{k}" for k in shots]
    datasets = [d for d in FGFS_DATASETS if any(k[0] == "few_shot" and k[3] == d for k in col.cells)]
    out, any_partial = [], False
    for backbone, method in rows:
        per_shot: Dict[int, List[float]] = defaultdict(list)
        for d in datasets:
            line: List[Any] = [backbone, method, d]
            for k in shots:
                v = _cell_value(col.cells.get(("few_shot", backbone, method, d, k)))
                line.append(v)
                if v.mean is not None:
                    per_shot[k].append(v.mean)
            if any(isinstance(c, Value) and c.mean is not None for c in line):
                out.append(line)
        if len(datasets) > 1:
            avg: List[Any] = [backbone, method, "**average**"]
            for k in shots:
                vals = per_shot.get(k, [])
                part = 0 < len(vals) < len(FGFS_DATASETS)
                any_partial |= part
                avg.append(Value(_mean(vals), partial=part))
            out.append(avg)
    notes = ["Cells: top-1 % on test_meta.list with the best-validation weights, mean ± sample std over seeds."]
    if any_partial:
        notes.append(f"{PARTIAL} partial: average over the datasets present only (of {len(FGFS_DATASETS)}).")
    return Table("Few-shot fine-grained (top-1 %)", header, out, notes, csv_header)


def dg_table(col: Collection) -> Optional[Table]:
    rows = _rows(col, "domain_generalization")
    if not rows:
        return None
    header = ["Backbone", "Method"] + [DG_LABELS[t] for t in DG_TARGETS] + ["Mean (4 targets)"]
    csv_header = ["backbone", "method"] + list(DG_TARGETS) + ["mean_4_targets"]
    out, any_partial = [], False
    for backbone, method in rows:
        line: List[Any] = [backbone, method]
        tmeans = []
        for t in DG_TARGETS:
            v = _cell_value(col.cells.get(("domain_generalization", backbone, method, t, None)))
            line.append(v)
            if t != "imagenet" and v.mean is not None:
                tmeans.append(v.mean)
        part = 0 < len(tmeans) < len(DG_TARGETS) - 1
        any_partial |= part
        line.append(Value(_mean(tmeans), partial=part))
        out.append(line)
    notes = ["Source: ImageNet 16-shot. Cells: top-1 % (1000-way), mean ± sample std over seeds."]
    if any_partial:
        notes.append(f"{PARTIAL} partial: mean over the targets present only.")
    return Table("Domain generalisation (top-1 %)", header, out, notes, csv_header)


def other_table(col: Collection) -> Optional[Table]:
    keys = sorted((k for k in col.cells if k[0].startswith("other:")), key=lambda k: tuple(str(x) for x in k))
    if not keys:
        return None
    rows = [[k[0][len("other:"):], k[3], k[1], k[2], _cell_value(col.cells[k])] for k in keys]
    return Table("Other results (unknown benchmark or dataset)", ["Benchmark", "Dataset", "Backbone", "Method",
                                                                   "Top-1 %"], rows)


def long_rows(col: Collection) -> List[List[Any]]:
    rows = [["benchmark", "backbone", "method", "dataset", "shot", "n", "mean", "std", "seeds", "files"]]
    for k in sorted(col.cells, key=lambda k: tuple(str(x) for x in k)):
        c = col.cells[k]
        rows.append([k[0], k[1], k[2], k[3], "" if k[4] is None else k[4], c.n,
                     "" if c.mean is None else round(c.mean, 4), "" if c.std is None else round(c.std, 4),
                     " ".join(str(s) for s in c.seeds), " ".join(c.files)])
    return rows


# ----------------------------------------------------------------------------------------------- output
def _csv_text(rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def plot_few_shot(col: Collection, path: str) -> Optional[str]:
    """Accuracy against shots, one subplot per dataset, one line per backbone + method; ``None`` if no data."""
    keys = [k for k in col.cells if k[0] == "few_shot"]
    if not keys:
        return None
    import matplotlib  # here, not at the top: importing pyplot takes a second, and most calls draw nothing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in FGFS_DATASETS if any(k[3] == d for k in keys)]
    rows = _rows(col, "few_shot")
    multi_backbone = len({b for b, _ in rows}) > 1
    n = len(datasets)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, d in zip(axes.flat, datasets):
        for backbone, method in rows:
            pts = sorted((k[4], col.cells[k]) for k in keys if k[1] == backbone and k[2] == method and k[3] == d)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1].mean for p in pts]
            es = [p[1].std or 0.0 for p in pts]
            label = f"{method} ({backbone})" if multi_backbone else method
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(FGFS_SHOTS))
        ax.set_xticklabels([str(s) for s in FGFS_SHOTS])
        ax.set_title(d)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("top-1 %")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Few-shot fine-grained: test top-1 (mean ± std over seeds)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def paper_rows(tables: Dict[str, Table]) -> List[List[Any]]:
    """``<base>_paper.csv``: one row per cell with a published number (ours may be empty)."""
    rows = [["table", "backbone", "method", "column", "ours", "paper", "difference"]]
    for name, t in tables.items():
        header = t.csv_header or t.header
        for r in t.rows:
            for i, c in enumerate(r):
                if isinstance(c, Value) and c.paper is not None:
                    ours = "" if c.mean is None else round(c.mean, 4)
                    diff = "" if c.mean is None else round(c.mean - c.paper, 4)
                    rows.append([name, r[0], r[1], header[i], ours, c.paper, diff])
    return rows


def build_tables(col: Collection, paper: bool = False) -> Dict[str, Table]:
    out: Dict[str, Table] = OrderedDict()
    vt = vtab_tables(col, paper=paper)
    if vt:
        out["vtab"], out["vtab_summary"] = vt
    for name, t in (("few_shot", few_shot_table(col)), ("dg", dg_table(col)), ("other", other_table(col))):
        if t is not None:
            out[name] = t
    return out


def render_markdown(tables: Dict[str, Table], decimals: int, col: Collection, root: str) -> str:
    parts = [f"## Results under {root} ({col.n_files} results.json file(s))"]
    if not tables:
        parts.append("No results found.")
    for t in tables.values():
        parts.append(t.markdown(decimals))
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("output_root", help="folder searched recursively for results.json files")
    parser.add_argument("--format", choices=("md", "csv"), default="md", help="what to print (default: md)")
    parser.add_argument("--out", default=None, help="Markdown file to write; CSV files go next to it "
                                                   "(default: OUTPUT_ROOT/aggregate.md)")
    parser.add_argument("--fig_dir", default="figs", help="folder of the few-shot plot (default: figs)")
    parser.add_argument("--decimals", type=int, default=1, help="decimals in the Markdown tables (default: 1)")
    parser.add_argument("--paper", action="store_true", help="the published number and our difference beside each "
                                                               "VTAB-1k cell that has one (+ <base>_paper.csv)")
    parser.add_argument("--skip_bad", action="store_true", help="skip unusable results.json files (unreadable, "
                        "fields missing, a top-1 that is not a number in [0, 100]; each noted on stderr) instead of "
                        "failing")
    args = parser.parse_args(argv)
    try:
        col = collect(args.output_root, skip_bad=args.skip_bad)
    except ResultsError as e:
        print(f"error: {e}\n(pass --skip_bad to skip unusable files)", file=sys.stderr)
        return 2
    for n in col.notes:
        print(f"note: {n}", file=sys.stderr)
    tables = build_tables(col, paper=args.paper)
    md = render_markdown(tables, args.decimals, col, args.output_root)
    base = os.path.splitext(args.out)[0] if args.out else os.path.join(args.output_root, "aggregate")
    written = []
    atomic_write_bytes(base + ".md", md.encode("utf-8"))
    written.append(base + ".md")
    csv_names = {"vtab": "vtab", "vtab_summary": "vtab_summary", "few_shot": "few_shot", "dg": "dg",
                 "other": "other"}
    csv_texts = []
    for name, t in tables.items():
        text = _csv_text(t.csv_rows())
        path = f"{base}_{csv_names[name]}.csv"
        atomic_write_bytes(path, text.encode("utf-8"))
        written.append(path)
        csv_texts.append(f"# {t.title}\n{text}")
    if args.paper:
        paper_path = f"{base}_paper.csv"
        atomic_write_bytes(paper_path, _csv_text(paper_rows(tables)).encode("utf-8"))
        written.append(paper_path)
    long_path = f"{base}_long.csv"
    atomic_write_bytes(long_path, _csv_text(long_rows(col)).encode("utf-8"))
    written.append(long_path)
    fig = plot_few_shot(col, os.path.join(args.fig_dir, "few_shot_curves.png"))
    if fig:
        written.append(fig)
    print(md if args.format == "md" else "\n".join(csv_texts), end="")
    print("wrote: " + ", ".join(written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
