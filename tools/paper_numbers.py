"""The published numbers ``tools/aggregate.py --paper`` puts beside our cells (a benchmark's
``TableLayout.paper`` names one of these functions).

The numbers live where the repository already keeps them: the per-task DTL numbers in tools/make_launchers.py
(written into the launchers' "Paper (...)" header lines) and the VTAB-1k means of the group means in
tools/plot_memory.py (DTL, DTL+ and the baselines, with their sources). They are for the paper's backbone only.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Tuple

_TOOLS = os.path.dirname(os.path.abspath(__file__))
if _TOOLS not in sys.path:
    sys.path.insert(1, _TOOLS)

PAPER_DTL_PRINTED_MEAN = 76.7  # DTL, ViT-B/16, VTAB-1k mean of the group means, as the paper prints it


def vtab() -> Dict[Tuple[str, str], Tuple[float, str]]:
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
