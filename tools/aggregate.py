#!/usr/bin/env python3
"""Collect every ``results.json`` under OUTPUT_ROOT into the papers' tables (Markdown + CSV) and a plot.

    python tools/aggregate.py output/                       # print Markdown, write output/aggregate*.{md,csv}
    python tools/aggregate.py output/ --out tables/results.md --fig_dir figs
    python tools/aggregate.py output/ --format csv          # print the CSV tables instead

One table per registered benchmark, laid out by its description (``Benchmark.table_layout``,
``data/benchmark.py``; the tables are built in ``engine/tables.py``):
* VTAB-1k: one row per backbone + method; the 19 tasks in the benchmark's order grouped Natural / Specialized /
  Structured, each group's mean, the mean of the three group means ("Mean (groups)", the paper's number) and the
  plain 19-task mean ("Mean (19 tasks)"). A mean over an incomplete group is marked ``†`` (partial: mean of the
  tasks present); ``–`` = missing.
* Few-shot: backbone + method + dataset x shots (1, 2, 4, 8, 16), an average row per backbone + method.
* Domain generalisation: ImageNet (source domain) and the four targets, plus the mean of the four targets.
* A benchmark without a layout (e.g. a newly registered one): one row per backbone + dataset, one column per
  method.
A value from a run that dropped unreadable images (``--skip_bad_images``; results.json ``skipped_images``) is
marked ``‡``, in the CSV files too (``<column>:images_skipped`` in the last column), and so is every mean it
enters. A cell is the mean over seeds, ``± std`` (sample standard deviation, n - 1) when there are several seeds.
Per-seed values come from ``per_seed`` (else ``top1`` with ``seed``); a seed found in several result files of
the same cell counts once (the newest file wins, noted on stderr). Results of unknown benchmarks or datasets
are listed in an "Other results" table, never dropped silently.

``--paper`` puts the published number and our difference beside each VTAB-1k cell that has one (ViT-B/16
ImageNet-21k rows only, the paper's backbone): ``70.1 (69.6, +0.5)``; they also go to ``<base>_paper.csv``.

Files (written atomically): ``<base>.md``, ``<base>_<table>.csv`` (cell means; ``<table>`` = the benchmark's
``table`` name: ``vtab``, ``vtab_summary``, ``few_shot``, ``dg``, ``other``, ...)
and ``<base>_long.csv`` (one row per cell: n, mean, std, seeds, files), where ``<base>`` is ``--out`` without
its extension, or ``OUTPUT_ROOT/aggregate``. The few-shot curves (accuracy against shots, one subplot per
dataset, one line per method) go to ``<fig_dir>/few_shot_curves.png`` (default ``figs/``; ``<table>_curves.png``
for any benchmark laid out by shots).
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from typing import Any, Iterable, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.benchmark import Benchmark  # noqa: E402
from data.benchmarks import REGISTRY  # noqa: E402
from engine.tables import (Collection, ResultsError, build_tables, collect, long_rows, paper_rows,  # noqa: E402
                           render_markdown, rows_of)
from utils.atomic import WriteError, atomic_write_bytes  # noqa: E402


# ----------------------------------------------------------------------------------------------- output
def _csv_text(rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def plot_shots(col: Collection, fig_dir: str) -> List[str]:
    """Accuracy against shots for every benchmark laid out by shots (``<fig_dir>/<table>_curves.png``: one
    subplot per dataset, one line per backbone + method); the files written."""
    out = []
    for bench in REGISTRY.values():
        if bench.table_layout.columns != "shots":
            continue
        keys = [k for k in col.cells if k[0] == bench.name]
        if keys:
            out.append(_plot_curves(col, keys, bench, os.path.join(fig_dir, f"{bench.table}_curves.png")))
    return out


def _plot_curves(col: Collection, keys: List[Any], bench: Benchmark, path: str) -> str:
    import matplotlib  # here, not at the top: importing pyplot takes a second, and most calls draw nothing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in bench.dataset_names if any(k[3] == d for k in keys)]
    ticks = bench.table_layout.shots or sorted({k[4] for k in keys})
    rows = rows_of(col, bench.name)
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
        ax.set_xticks(list(ticks))
        ax.set_xticklabels([str(s) for s in ticks])
        ax.set_title(d)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("top-1 %")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    name = (bench.table_layout.title or bench.title).replace(" (top-1 %)", "")
    fig.suptitle(f"{name}: test top-1 (mean ± std over seeds)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
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
    written: List[str] = []
    try:
        atomic_write_bytes(base + ".md", md.encode("utf-8"))
        written.append(base + ".md")
        csv_texts = []
        for name, t in tables.items():
            text = _csv_text(t.csv_rows())
            path = f"{base}_{name}.csv"
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
        written += plot_shots(col, args.fig_dir)
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(md if args.format == "md" else "\n".join(csv_texts), end="")
    print("wrote: " + ", ".join(written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
