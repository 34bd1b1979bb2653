"""Atomic file writing: the one helper every file of the project is written with.

Kept free of torch (``utils.checkpoint.atomic_torch_save`` builds on it), so light tools can use it.
A file is written to a temporary name in the destination folder and moved into place with ``os.replace``, so a
reader (or a run killed half-way) never sees a half-written file; on failure the temporary file is removed and
:class:`WriteError` says ``could not write <file>: <OS reason>`` (e.g. "No space left on device").
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, Callable, List, Optional

import numpy as np

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "WriteError",
           "write_error", "ErrorRecordingFile", "remove_stale_temporaries"]


class WriteError(OSError):
    """A file (or folder) that could not be written; the message names it and the operating system's reason."""


def write_error(path: str, e: BaseException) -> WriteError:
    """``could not write <path>: <reason>`` from an ``OSError`` (its ``strerror``) or another exception."""
    reason = (e.strerror or str(e)) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
    err = WriteError(f"could not write {path}: {reason}")
    if isinstance(e, OSError):
        err.errno = e.errno
    return err


class ErrorRecordingFile:
    """A binary file wrapper that remembers the first ``OSError`` of ``write`` (``torch.save`` replaces it with
    an uninformative ``RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos``)."""

    def __init__(self, f) -> None:
        self.f = f
        self.error: Optional[OSError] = None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call ``write(tmp_path)`` to produce the file's content under a temporary name next to ``path`` (ending
    in ``suffix``, for writers that choose the format by extension), then move it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix, dir=folder)
        os.close(fd)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise write_error(path, e) from e
        raise


# The temporary names of atomic_write: "." + file name + "." + mkstemp's 8 random characters + suffix.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.(tmp|npz|png)$")


def remove_stale_temporaries(folder: str) -> List[str]:
    """Remove what :func:`atomic_write` left in ``folder`` when its process was killed mid-write (``kill -9``
    during a checkpoint write); returns the names removed. Call it only while no other process writes into
    ``folder`` (a run folder whose lock this process holds)."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(folder, name)
        if _TEMPORARY.match(name) and os.path.isfile(path) and not os.path.islink(path):
            try:
                os.unlink(path)
                removed.append(name)
            except OSError:
                pass
    return sorted(removed)


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if hasattr(o, "tolist"):  # torch tensors, numpy arrays
        return o.tolist()
    return str(o)


def atomic_write_json(path: str, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")
