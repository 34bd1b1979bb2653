"""Run-folder logging: ``log.txt`` (appended), the per-epoch ``summary.csv`` and TensorBoard events.

Only rank 0 writes files; the other ranks log warnings and errors to stderr.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from torch.utils.tensorboard import SummaryWriter

from .atomic import atomic_write_text

__all__ = ["setup_logging", "add_file_log", "close_file_logs", "log_to_files", "SummaryTable", "TensorBoardLogger",
           "format_duration"]

_FMT = "%(asctime)s %(levelname).1s %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Console logging: INFO and up on rank 0, WARNING and up (tagged with the rank) elsewhere."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dtl_handler", False):
            root.removeHandler(h)
            h.close()
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    fmt = _FMT if rank == 0 else f"[rank {rank}] " + _FMT
    handler.setFormatter(logging.Formatter(fmt, _DATEFMT))
    handler._dtl_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    if rank == 0:
        early = _EarlyRecords()
        early._dtl_handler = True  # type: ignore[attr-defined]
        root.addHandler(early)


class _EarlyRecords(logging.Handler):
    """Keeps the records logged before ``log.txt`` exists (checks, model building), so that the file starts with
    them (at most ``capacity``)."""

    def __init__(self, capacity: int = 2000) -> None:
        super().__init__(logging.INFO)
        self.capacity = capacity
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.capacity:
            self.records.append(record)


def _early() -> Optional[_EarlyRecords]:
    return next((h for h in logging.getLogger().handlers if isinstance(h, _EarlyRecords)), None)


def add_file_log(path: str) -> logging.Handler:
    """Append the log to ``path`` as well (never truncated: a resumed run continues the same file), starting
    with what was logged since :func:`setup_logging`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FMT, _DATEFMT))
    handler._dtl_handler = True  # type: ignore[attr-defined]
    early = _early()
    if early is not None:
        logging.getLogger().removeHandler(early)
        for record in early.records:
            handler.handle(record)
    logging.getLogger().addHandler(handler)
    return handler


def log_to_files(message: str, exc_info: bool = True) -> None:
    """Write an ERROR record (with the current exception's traceback) to the ``log.txt`` handlers only (the
    console gets Python's own traceback)."""
    record = logging.getLogger("train").makeRecord("train", logging.ERROR, __file__, 0, message, (),
                                                   sys.exc_info() if exc_info else None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class SummaryTable:
    """Rows of ``summary.csv``: one per epoch; columns are the union of the keys seen, in first-seen order.

    The whole file is rewritten atomically after every row, so the rows (kept in the resume checkpoint)
    reproduce the file exactly after a resume.
    """

    def __init__(self, path: Optional[str], rows: Optional[Sequence[Dict[str, Any]]] = None) -> None:
        self.path = path
        self.rows: List[Dict[str, Any]] = [dict(r) for r in rows or []]

    def add(self, row: Dict[str, Any]) -> None:
        self.rows.append(dict(row))
        self.write()

    def columns(self) -> List[str]:
        cols: List[str] = []
        for r in self.rows:
            for k in r:
                if k not in cols:
                    cols.append(k)
        return cols

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns(), lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: _fmt(v) for k, v in r.items()})
        return buf.getvalue()

    def write(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, self.to_csv())


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v)  # full precision: equal numbers give equal text
    return "" if v is None else v


class TensorBoardLogger:
    """Scalars to TensorBoard event files in the run folder (a no-op when disabled)."""

    def __init__(self, log_dir: Optional[str]) -> None:
        self.writer = None
        if log_dir is None:
            return
        self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def close_file_logs() -> None:
    """Close the ``log.txt`` handlers (at the end of a run; the console handler stays)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dtl_handler", False) and isinstance(h, (logging.FileHandler, _EarlyRecords)):
            root.removeHandler(h)
            h.close()
