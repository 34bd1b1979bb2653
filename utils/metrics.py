"""Accuracy counting (exact across processes), resource usage (peak RSS; the CUDA memory peaks per phase of a
run, :class:`PeakMemory`) and version stamps."""
from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
import sys
from typing import Callable, Dict, Iterator, Mapping, Optional

import numpy
import timm
import torch

from .distributed import all_reduce_sum

__all__ = [
    "TopKCounter", "peak_rss_mib", "versions", "mean_std", "PeakMemory",
]


class TopKCounter:
    """Counts correct top-1 / top-5 predictions and the number of images; :meth:`reduce` sums over ranks.

    Counting (instead of averaging per-batch accuracies) makes the result exact for any batch split.
    """

    def __init__(self, device: torch.device) -> None:
        self.counts = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, n, loss_sum

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: Optional[torch.Tensor] = None) -> None:
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk.eq(target.view(-1, 1))
        self.counts[0] += hit[:, 0].sum().double()
        self.counts[1] += hit.any(dim=1).sum().double()
        self.counts[2] += target.numel()
        if loss_sum is not None:
            self.counts[3] += loss_sum.double()

    def reduce(self) -> Dict[str, float]:
        """``top1``, ``top5`` (percent), ``loss`` (mean) and ``n`` (images), summed over all processes."""
        c = all_reduce_sum(self.counts.clone()).cpu().tolist()
        n = max(c[2], 1.0)
        return {"top1": 100.0 * c[0] / n, "top5": 100.0 * c[1] / n, "loss": c[3] / n, "n": int(c[2])}


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024.0


class PeakMemory:
    """Peak CUDA memory (``torch.cuda.max_memory_allocated``) per phase of a run, in bytes.

    ``with peaks.phase("train"):`` resets the device's peak counter on entry and reads it on exit; a phase keeps
    the maximum over all its blocks. ``run`` is the peak of the whole invocation: every reading, including the
    one taken just before each reset (what ran between phases: model building, checkpoint writing) and
    :meth:`finish`. Phases used by train.py: ``train`` (each training epoch, after the prefix cache is built and
    before any evaluation), ``eval`` (validation and test evaluation) and ``cache_build`` (the prefix cache).

    Off CUDA every value is ``None``. ``read``/``reset`` replace the CUDA calls (tests); ``initial`` continues the
    maxima of an interrupted run (``last.pth``).
    """

    PHASES = ("train", "eval", "cache_build", "run")

    def __init__(self, device: torch.device, read: Optional[Callable[[], int]] = None,
                 reset: Optional[Callable[[], None]] = None, initial: Optional[Mapping[str, Optional[int]]] = None):
        self.enabled = device.type == "cuda" or read is not None
        self._read = read or (lambda: torch.cuda.max_memory_allocated(device))
        self._reset = reset or (lambda: torch.cuda.reset_peak_memory_stats(device))
        self.bytes: Dict[str, Optional[int]] = {k: None for k in self.PHASES}
        for k, v in (initial or {}).items():
            if k in self.bytes and v is not None:
                self.bytes[k] = int(v)
        self._open: Optional[str] = None

    def _note(self, phase: str, value: int) -> None:
        for k in (phase, "run"):
            old = self.bytes[k]
            self.bytes[k] = value if old is None else max(old, value)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in self.PHASES or name == "run":
            raise ValueError(f"unknown memory phase {name!r}")
        if not self.enabled or self._open is not None:  # off CUDA, or nested: the outer phase counts it
            yield
            return
        self._note("run", int(self._read()))  # what happened since the last reading
        self._reset()
        self._open = name
        try:
            yield
        finally:
            self._open = None
            self._note(name, int(self._read()))

    def finish(self) -> None:
        """Read the counter once more (the end of the run) into ``run``."""
        if self.enabled and self._open is None:
            self._note("run", int(self._read()))

    def state(self) -> Dict[str, Optional[int]]:
        """The maxima in bytes (for ``last.pth``)."""
        return dict(self.bytes)

    def mib(self) -> Dict[str, Optional[float]]:
        return {k: (None if v is None else v / float(1 << 20)) for k, v in self.bytes.items()}


def mean_std(values) -> Dict[str, Optional[float]]:
    """Mean and sample standard deviation (``None`` for fewer than two values)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": None, "std": None}
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return {"mean": m, "std": None}
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return {"mean": m, "std": var ** 0.5}


def _git_commit(repo: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> Dict[str, Optional[str]]:
    """Versions of what produced a result: Python, torch, timm, numpy, CUDA/cuDNN, GPU name, git commit."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    v: Dict[str, Optional[str]] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "git_commit": _git_commit(repo),
    }
    return v
