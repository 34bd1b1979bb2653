"""Results tables from ``results.json`` files: collection (one cell per benchmark, backbone, method, dataset and
shot; per-seed values) and one table per benchmark laid out by its :class:`~data.benchmark.TableLayout`.

``tools/aggregate.py`` writes these tables; ``tools/run_table.py`` calls it and marks its status table the same
way. A registered benchmark gets its table from its description alone (no ``tools/`` edit). No torch here.

Marks: ``†`` a mean over an incomplete set (partial), ``‡`` a value from a run that skipped unreadable images
(``--skip_bad_images``: results.json ``skipped_images`` > 0), ``–`` no result.
"""
from __future__ import annotations

import importlib
import json
import math
import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from data.benchmark import Benchmark, TableLayout
from data.benchmarks import REGISTRY, canonical_benchmark, get_benchmark
from methods import featured_results_names

__all__ = ["ResultsError", "Cell", "Collection", "Value", "Table", "collect", "add_results_file", "find_results",
           "build_tables", "long_rows", "paper_rows", "render_markdown", "skipped_images", "rows_of",
           "PARTIAL", "SKIPPED", "DASH", "SKIPPED_NOTE"]

DASH = "–"
PARTIAL = "†"  # marks a mean over an incomplete set (no Markdown meaning, unlike *)
SKIPPED = "‡"  # marks a value from a run that dropped unreadable images (--skip_bad_images)
SKIPPED_NOTE = (f"{SKIPPED} images skipped: the run dropped unreadable images (--skip_bad_images; results.json "
                "skipped_images), so it was trained or evaluated on fewer images than the lists name.")


class ResultsError(ValueError):
    """A results.json that cannot be used (names the file)."""


# ----------------------------------------------------------------------------------------------- collection
@dataclass
class Cell:
    """All per-seed accuracies of one (benchmark, backbone, method, dataset, shot) combination."""

    by_seed: Dict[Any, Tuple[float, float, str]] = field(default_factory=dict)  # seed -> (top1, mtime, file)
    unseeded: List[Tuple[float, str]] = field(default_factory=list)
    skipped_in: Dict[str, int] = field(default_factory=dict)  # file -> images it skipped (when > 0)

    def add(self, seed: Any, top1: float, mtime: float, path: str, notes: List[str], label: str) -> None:
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
    def images_skipped(self) -> int:
        """Images skipped by the runs whose values the cell uses."""
        return sum(self.skipped_in.get(f, 0) for f in self.files)

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
    """The cells of every results.json read, with notes (duplicates, skipped files)."""

    cells: Dict[Key, Cell] = field(default_factory=lambda: defaultdict(Cell))
    notes: List[str] = field(default_factory=list)
    n_files: int = 0

    def add(self, key: Key, seed: Any, top1: float, mtime: float, path: str, skipped: int = 0) -> None:
        label = "/".join(str(k) for k in key if k is not None)
        cell = self.cells[key]
        cell.add(seed, float(top1), mtime, path, self.notes, label)
        if skipped:
            cell.skipped_in[path] = skipped


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


def _seed_of(res: Dict[str, Any]) -> Any:
    if res.get("seed") is not None:
        return res["seed"]
    args = res.get("args") or {}
    if isinstance(args, dict) and args.get("seed") is not None:
        return args["seed"]
    return None


def _num(x: Any, path: str, what: str) -> float:
    """A top-1 accuracy in percent: a finite number in [0, 100], else :class:`ResultsError` naming the file."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        raise ResultsError(f"{path}: {what} must be a finite number, got {x!r}")
    if not 0.0 <= float(x) <= 100.0:
        raise ResultsError(f"{path}: {what} = {x!r} is not a top-1 accuracy in percent (outside [0, 100])")
    return float(x)


def skipped_images(res: Dict[str, Any]) -> int:
    """Images a run dropped (results.json ``skipped_images``, written with ``--skip_bad_images``); 0 if none."""
    n = res.get("skipped_images")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def add_results_file(col: Collection, path: str) -> None:
    """Add one results.json to the collection; :class:`ResultsError` naming the file when it is unusable. Every
    value of the file is checked before any is added, so a skipped file (``--skip_bad``) leaves nothing behind."""
    pending: List[Tuple[Key, Any, float]] = []
    res = _read_results_file(pending, path)
    mtime = os.path.getmtime(path)
    col.n_files += 1
    for key, seed, top1 in pending:
        col.add(key, seed, top1, mtime, path, skipped_images(res))


def _read_results_file(pending: List[Tuple[Key, Any, float]], path: str) -> Dict[str, Any]:
    """The (cell key, seed, top-1) values of one results.json, appended to ``pending``; returns its body."""
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
    desc = REGISTRY.get(bench)
    shot = res.get("shot")
    if desc is not None and desc.table_layout.columns == "shots":
        if shot is None and isinstance(res.get("args"), dict):
            shot = res["args"].get("shot")
        if shot is None:
            raise ResultsError(f"{path}: {desc.title} result without 'shot'")
        shot = int(shot)
    else:
        shot = None
    bench_key = bench if known else "other:" + bench
    per_seed = res.get("per_seed") or []

    if known and desc.targets:
        # One run may evaluate several targets (per_seed[i]['targets'] / per_target).
        tgt = res.get("target")
        targets = tgt if isinstance(tgt, list) else [tgt if isinstance(tgt, str) and tgt else dataset]
        targets = [_canon_dataset(bench, t)[0] for t in targets]
        if per_seed and all(isinstance(s, dict) and isinstance(s.get("targets"), dict) for s in per_seed):
            for s in per_seed:
                for t, v in s["targets"].items():
                    pending.append(((bench_key, backbone, method, _canon_dataset(bench, t)[0], None),
                                    s.get("seed"), _num(v, path, f"per_seed target {t}")))
            return res
        if isinstance(res.get("per_target"), dict) and len(res["per_target"]) > 1:
            for t, v in res["per_target"].items():
                top = v.get("top1") if isinstance(v, dict) else v
                pending.append(((bench_key, backbone, method, _canon_dataset(bench, t)[0], None), None,
                                _num(top, path, f"per_target {t}")))
            return res
        dataset = targets[0]
    key = (bench_key, backbone, method, dataset, shot)
    if per_seed:
        for s in per_seed:
            if not isinstance(s, dict) or "top1" not in s:
                raise ResultsError(f"{path}: per_seed entries must be objects with 'seed' and 'top1'")
            pending.append((key, s.get("seed"), _num(s["top1"], path, "per_seed top1")))
    else:
        pending.append((key, _seed_of(res), _num(res["top1"], path, "top1")))
    return res


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


# ----------------------------------------------------------------------------------------------- cells
@dataclass
class Value:
    """A table cell: mean, optional std / n, whether it is a partial mean, whether images were skipped."""

    mean: Optional[float]
    std: Optional[float] = None
    n: int = 0
    partial: bool = False
    paper: Optional[float] = None  # the published number for this cell (``--paper``)
    skipped: bool = False

    def fmt(self, decimals: int) -> str:
        if self.mean is None:
            return DASH + (f" ({self.paper:.1f})" if self.paper is not None else "")
        s = f"{self.mean:.{decimals}f}"
        if self.std is not None:
            s += f" ± {self.std:.{decimals}f}"
        s += (PARTIAL if self.partial else "") + (SKIPPED if self.skipped else "")
        if self.paper is not None:
            s += f" ({self.paper:.1f}, {self.mean - self.paper:+.{decimals}f})"
        return s


@dataclass
class Table:
    """A titled table: label columns then :class:`Value` cells, footnotes, and the CSV header."""

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
        """Means only (std and n are in the long CSV); a last column names the partial means of the row and
        the cells whose runs skipped images (``<column>:images_skipped``)."""
        header = list(self.csv_header or self.header)
        rows = [header + ["partial"]]
        for r in self.rows:
            marks = [header[i] for i, c in enumerate(r) if isinstance(c, Value) and c.partial]
            marks += [f"{header[i]}:images_skipped" for i, c in enumerate(r) if isinstance(c, Value) and c.skipped]
            rows.append([("" if c.mean is None else round(c.mean, 4)) if isinstance(c, Value) else str(c).strip("*")
                         for c in r] + [";".join(marks)])
        return rows

    def mark_notes(self) -> None:
        """Add the legend of ``‡`` when a cell carries it."""
        if SKIPPED_NOTE not in self.footnotes and any(isinstance(c, Value) and c.skipped
                                                      for r in self.rows for c in r):
            self.footnotes.append(SKIPPED_NOTE)


def _method_key(method: str) -> Tuple[int, str]:
    """The order of methods in a table: the featured method's names first (DTL, DTL+), then by name."""
    first = featured_results_names()
    return (first.index(method) if method in first else len(first), method)


def _cell_value(cell: Optional[Cell]) -> Value:
    if cell is None or cell.n == 0:
        return Value(None)
    return Value(cell.mean, cell.std, cell.n, skipped=cell.images_skipped > 0)


def _mean_of(values: Sequence[Value], partial: bool) -> Value:
    """The mean of the present values (skipped-images mark inherited)."""
    present = [v for v in values if v.mean is not None]
    mean = sum(v.mean for v in present) / len(present) if present else None
    return Value(mean, partial=partial and bool(present), skipped=any(v.skipped for v in present))


def rows_of(col: Collection, bench: str) -> List[Tuple[str, str]]:
    """(backbone, method) of a benchmark's cells: by backbone, DTL first, then by name."""
    rows = {(k[1], k[2]) for k in col.cells if k[0] == bench}

    def order(r: Tuple[str, str]) -> Tuple[str, int, str]:
        b, m = r
        return (b, *_method_key(m))

    return sorted(rows, key=order)


def _published(layout: TableLayout) -> Dict[Tuple[str, str], Tuple[float, str]]:
    module, _, name = layout.paper.partition(":")
    return getattr(importlib.import_module(module), name)()


def _title(bench: Benchmark) -> str:
    return bench.table_layout.title or f"{bench.title} (top-1 %)"


def _partial_note(bench: Benchmark) -> str:
    return f"{PARTIAL} partial: " + bench.table_layout.partial_note.format(n=len(bench.dataset_names))


# ----------------------------------------------------------------------------------------------- layouts
def datasets_tables(col: Collection, bench: Benchmark, paper: bool = False) -> List[Tuple[str, Table]]:
    """Rows backbone + method, columns the datasets (grouped: each group's mean, the mean of the group means,
    a count column and a summary table), then the plain mean. ``paper``: published numbers beside the cells."""
    lay = bench.table_layout
    rows = rows_of(col, bench.name)
    if not rows:
        return []
    published = _published(lay) if paper and lay.paper else {}

    def pub(backbone: str, method: str, column: str) -> Optional[float]:
        hit = published.get((method, column)) if backbone == lay.paper_backbone else None
        return hit[0] if hit else None

    groups = lay.groups or (("", "", tuple(bench.dataset_names)),)
    labels = dict(lay.labels)
    in_mean = [d for _, _, ds in groups for d in ds if d not in lay.mean_excludes]
    n_all = len(in_mean)
    grouped = bool(lay.groups)
    bold = (lambda s: f"**{s}**") if grouped else (lambda s: s)
    mean_label, mean_csv = f"Mean ({n_all} {lay.item})", f"mean_{n_all}_{lay.item}"
    header, csv_header = ["Backbone", "Method"], ["backbone", "method"]
    for key, label, ds in groups:
        header += [labels.get(d, d) for d in ds] + ([f"**{label}**"] if grouped else [])
        csv_header += list(ds) + ([f"mean_{key}"] if grouped else [])
    if grouped:
        header.append("**Mean (groups)**")
        csv_header.append("mean_of_group_means")
    header.append(bold(mean_label))
    csv_header.append(mean_csv)
    if grouped:
        header.append(lay.item.capitalize())
        csv_header.append(f"n_{lay.item}")
    full, summary = [], []
    any_partial = False
    for backbone, method in rows:
        line: List[Any] = [backbone, method]
        group_means, plain = [], []
        complete = True
        for key, _, ds in groups:
            values = []
            for d in ds:
                v = _cell_value(col.cells.get((bench.name, backbone, method, d, None)))
                v.paper = pub(backbone, method, d)
                line.append(v)
                values.append(v)
                if d not in lay.mean_excludes:
                    plain.append(v)
            n_present = sum(v.mean is not None for v in values)
            complete &= n_present == len(ds)
            if grouped:
                gv = _mean_of(values, partial=0 < n_present < len(ds))
                line.append(gv)
                group_means.append(gv)
        n_plain = sum(v.mean is not None for v in plain)
        if grouped:
            any_partial |= not complete
            mg = _mean_of(group_means, partial=not complete)
            mg.paper = pub(backbone, method, "mean_of_group_means")
            m_plain = _mean_of(plain, partial=not complete)
            count = f"{n_plain}/{n_all}"
            line += [mg, m_plain, count]
            summary.append([backbone, method, *group_means, mg, m_plain, count])
        else:
            m_plain = _mean_of(plain, partial=0 < n_plain < n_all)
            any_partial |= m_plain.partial
            line.append(m_plain)
        full.append(line)
    notes = [lay.note]
    if any_partial:
        notes.append(_partial_note(bench))
    if any(isinstance(c, Value) and c.paper is not None for r in full for c in r):
        notes.append(f"x (p, d): ours x, the published number p and the difference d = x - p, for "
                     f"{lay.paper_backbone} rows only: {lay.paper_note}")
    summary_notes = list(notes)
    main = Table(_title(bench), header, full, notes, csv_header)
    main.mark_notes()
    out = [(bench.table, main)]
    if grouped:
        s_header = ["Backbone", "Method", *(label for _, label, _ in groups), "Mean (groups)", mean_label,
                    lay.item.capitalize()]
        s_csv = ["backbone", "method", *(key for key, _, _ in groups), "mean_of_group_means", mean_csv,
                 f"n_{lay.item}"]
        s = Table(f"{bench.title} summary", s_header, summary, summary_notes, s_csv)
        s.mark_notes()
        out.append((f"{bench.table}_summary", s))
    return out


def shots_table(col: Collection, bench: Benchmark) -> List[Tuple[str, Table]]:
    """Rows backbone + method + dataset (and an average row per backbone + method), columns the shots."""
    lay = bench.table_layout
    rows = rows_of(col, bench.name)
    if not rows:
        return []
    shots = sorted({k[4] for k in col.cells if k[0] == bench.name} | set(lay.shots))
    header = ["Backbone", "Method", "Dataset"] + [f"{k}-shot" for k in shots]
    csv_header = ["backbone", "method", "dataset"] + [f"shot_{k}" for k in shots]
    datasets = [d for d in bench.dataset_names if any(k[0] == bench.name and k[3] == d for k in col.cells)]
    out, any_partial = [], False
    for backbone, method in rows:
        per_shot: Dict[int, List[Value]] = defaultdict(list)
        for d in datasets:
            line: List[Any] = [backbone, method, d]
            for k in shots:
                v = _cell_value(col.cells.get((bench.name, backbone, method, d, k)))
                line.append(v)
                if v.mean is not None:
                    per_shot[k].append(v)
            if any(isinstance(c, Value) and c.mean is not None for c in line):
                out.append(line)
        if len(datasets) > 1:
            avg: List[Any] = [backbone, method, "**average**"]
            for k in shots:
                vals = per_shot.get(k, [])
                part = 0 < len(vals) < len(bench.dataset_names)
                any_partial |= part
                avg.append(_mean_of(vals, partial=part))
            out.append(avg)
    notes = [lay.note]
    if any_partial:
        notes.append(_partial_note(bench))
    t = Table(_title(bench), header, out, notes, csv_header)
    t.mark_notes()
    return [(bench.table, t)]


def methods_table(col: Collection, bench: Benchmark) -> List[Tuple[str, Table]]:
    """The default layout: rows backbone + dataset (the benchmark's order, then by name), columns the methods."""
    keys = [k for k in col.cells if k[0] == bench.name]
    if not keys:
        return []
    methods = sorted({k[2] for k in keys}, key=_method_key)
    order = {d: i for i, d in enumerate(bench.dataset_names)}
    pairs = sorted({(k[1], k[3]) for k in keys}, key=lambda p: (p[0], order.get(p[1], len(order)), p[1]))
    rows = [[b, d, *(_cell_value(col.cells.get((bench.name, b, m, d, None))) for m in methods)] for b, d in pairs]
    notes = [f"{bench.table_layout.note} {DASH} = no result."]
    t = Table(_title(bench), ["Backbone", "Dataset", *methods], rows, notes, ["backbone", "dataset", *methods])
    t.mark_notes()
    return [(bench.table, t)]


def other_table(col: Collection) -> Optional[Table]:
    """Results of an unknown benchmark or dataset, one row each (never dropped silently)."""
    keys = sorted((k for k in col.cells if k[0].startswith("other:")), key=lambda k: tuple(str(x) for x in k))
    if not keys:
        return None
    rows = [[k[0][len("other:"):], k[3], k[1], k[2], _cell_value(col.cells[k])] for k in keys]
    t = Table("Other results (unknown benchmark or dataset)", ["Benchmark", "Dataset", "Backbone", "Method",
                                                               "Top-1 %"], rows)
    t.mark_notes()
    return t


def benchmark_tables(col: Collection, bench: Benchmark, paper: bool = False) -> List[Tuple[str, Table]]:
    """The table(s) of one benchmark, by its layout's ``columns``; ``(file name, table)`` pairs."""
    kind = bench.table_layout.columns
    if kind == "datasets":
        return datasets_tables(col, bench, paper=paper)
    if kind == "shots":
        return shots_table(col, bench)
    if kind == "methods":
        return methods_table(col, bench)
    raise ValueError(f"benchmark {bench.name}: unknown table layout columns={kind!r} (datasets, shots, methods)")


def build_tables(col: Collection, paper: bool = False) -> Dict[str, Table]:
    """Every registered benchmark's tables (registry order), then the "other" table; keyed by file name."""
    out: Dict[str, Table] = OrderedDict()
    for bench in REGISTRY.values():
        out.update(benchmark_tables(col, bench, paper=paper))
    other = other_table(col)
    if other is not None:
        out["other"] = other
    return out


def long_rows(col: Collection) -> List[List[Any]]:
    """``<base>_long.csv``: one row per cell (n, mean, std, seeds, files)."""
    rows = [["benchmark", "backbone", "method", "dataset", "shot", "n", "mean", "std", "seeds", "files"]]
    for k in sorted(col.cells, key=lambda k: tuple(str(x) for x in k)):
        c = col.cells[k]
        rows.append([k[0], k[1], k[2], k[3], "" if k[4] is None else k[4], c.n,
                     "" if c.mean is None else round(c.mean, 4), "" if c.std is None else round(c.std, 4),
                     " ".join(str(s) for s in c.seeds), " ".join(c.files)])
    return rows


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


def render_markdown(tables: Dict[str, Table], decimals: int, col: Collection, root: str) -> str:
    """The whole Markdown report: a heading, then every table."""
    parts = [f"## Results under {root} ({col.n_files} results.json file(s))"]
    if not tables:
        parts.append("No results found.")
    for t in tables.values():
        parts.append(t.markdown(decimals))
    return "\n\n".join(parts) + "\n"
