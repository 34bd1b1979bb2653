"""Outcomes of a table's runs: the progress line, the status table (``status.md``) and the aggregated table
(``table.md`` through ``tools/aggregate.py --paper``), and the exit status."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from engine.tables import SKIPPED, SKIPPED_NOTE, skipped_images
from utils.atomic import atomic_write_text

# statuses that are not a failure (the exit status is 0 only when every run has one of them)
FINISHED = ("done", "skipped")


@dataclass
class Outcome:
    """What became of one run: done / skipped / failed / interrupted / not run / running elsewhere / pending /
    running / not finished."""

    name: str
    status: str
    seconds: Optional[float] = None
    detail: str = ""


def read_top1(out_dir: str) -> str:
    """The run's top-1 from results.json (``‡`` when it skipped images), or ``""``."""
    try:
        with open(os.path.join(out_dir, "results.json"), encoding="utf-8") as f:
            r = json.load(f)
        return f"{float(r['top1']):.2f}" + (SKIPPED if skipped_images(r) else "")
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def hms(s: Optional[float]) -> str:
    """``H:MM:SS`` of a duration in seconds (``""`` for None)."""
    if s is None:
        return ""
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def status_markdown(outcomes: Sequence[Outcome], root: str) -> str:
    """The status table of the runs, their counts by status, and the legend of ``‡`` when a top-1 has it."""
    lines = ["| run | status | top-1 | time | log / note |", "|---|---|---:|---:|---|"]
    marked = False
    for o in outcomes:
        top1 = read_top1(os.path.join(root, o.name))
        marked |= top1.endswith(SKIPPED)
        lines.append(f"| {o.name} | {o.status} | {top1} | {hms(o.seconds)} | {o.detail} |")
    counts: Dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    return "\n".join(lines) + f"\n\n{len(outcomes)} run(s): {summary}\n" + (f"\n{SKIPPED_NOTE}\n" if marked else "")


class Progress:
    """One line per change (and at most every ``every_s`` otherwise): done, running, queued, failed, ETA."""

    def __init__(self, total: int, slots: int, stream=None, every_s: float = 60.0) -> None:
        self.total, self.slots, self.every_s = total, max(1, slots), every_s
        self.stream = stream or sys.stderr
        self.durations: List[float] = []
        self.last: Tuple = ()
        self.last_t = 0.0

    def eta(self, running_since: Sequence[float], queued: int) -> Optional[float]:
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        now = time.time()
        left_running = [max(0.0, mean - (now - t)) for t in running_since]
        # queued runs go through the slots in waves after the running ones
        return max(left_running + [0.0]) + mean * -(-queued // self.slots)

    def show(self, done: int, running_since: Sequence[float], queued: int, failed: int, force: bool = False) -> None:
        key = (done, len(running_since), queued, failed)
        now = time.time()
        if not force and key == self.last and now - self.last_t < self.every_s:
            return
        self.last, self.last_t = key, now
        eta = self.eta(running_since, queued)
        print(f"[run_table {time.strftime('%H:%M:%S')}] {done}/{self.total} done, {len(running_since)} running, "
              f"{queued} queued, {failed} failed, ETA {hms(eta) if eta is not None else '?'}",
              file=self.stream, flush=True)


def finish(outcomes: Sequence[Outcome], root: str) -> int:
    """Status table (printed, status.md) and the aggregated table (table.md + CSV); the exit status."""
    from tools import aggregate

    status = status_markdown(outcomes, root)
    atomic_write_text(os.path.join(root, "status.md"), "# run_table status\n\n" + status)
    print("\n" + status, end="")
    rc = aggregate.main([root, "--out", os.path.join(root, "table.md"), "--fig_dir", os.path.join(root, "figs"),
                         "--paper", "--skip_bad"])
    if rc != 0:
        print(f"run_table: aggregate.py failed (exit {rc})", file=sys.stderr)
    print(f"\nstatus: {os.path.join(root, 'status.md')}\ntable:  {os.path.join(root, 'table.md')}")
    bad = [o for o in outcomes if o.status not in FINISHED]
    return 1 if bad or rc != 0 else 0
