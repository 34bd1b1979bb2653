"""An exclusive lock on a run folder, held for a whole run by one process.

The lock is an ``flock`` on ``<run folder>/.lock``; the file holds who took it (host, pid, since, command).
The operating system drops an ``flock`` when its process ends in any way (a crash, ``kill -9``), so a lock left
by a dead process is *stale*: the file is still there, but locking it succeeds. The next run takes it over and
says whose it was. A second process that finds the lock held is refused at once, naming the holder. A run that
ends normally removes the file.

On file systems without working ``flock`` (some network mounts) the run goes on unlocked, with a warning.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from typing import Any, Dict, Optional

from .atomic import write_error

__all__ = ["RunLock", "RunLockedError", "LOCK_NAME", "describe_holder"]

LOCK_NAME = ".lock"
_logger = logging.getLogger("train")


class RunLockedError(RuntimeError):
    """The run folder is in use by another live process (the message names it)."""


def describe_holder(info: Optional[Dict[str, Any]]) -> str:
    if not info:
        return "a process that left no details"
    return (f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('since')}"
            + (f" ({info['command']})" if info.get("command") else ""))


def _read(fd: int) -> Optional[Dict[str, Any]]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 1 << 16)
        return json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, ValueError):
        return None


class RunLock:
    """``RunLock(folder).acquire()`` ... ``release()``; :class:`RunLockedError` when another process holds it."""

    def __init__(self, folder: str) -> None:
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise write_error(self.path, e) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = _read(fd)
                    os.close(fd)
                    raise RunLockedError(
                        f"{self.folder} is in use by another run: {describe_holder(holder)}. Wait for it to end (or "
                        f"stop it), or choose another --output_dir") from None
                os.close(fd)
                _logger.warning("cannot lock the run folder (%s: %s): running without the lock; make sure no other "
                                "run uses %s", self.path, e.strerror, self.folder)
                return
            try:  # the holder we waited for may have removed the file just before we locked it: lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read(fd)
        if previous:
            _logger.warning("taking over the stale lock of %s in %s (that process has ended without releasing it)",
                            describe_holder(previous), self.folder)
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "since": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:500]}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
        except OSError as e:
            os.close(fd)
            raise write_error(self.path, e) from e
        self.fd = fd

    def check_free(self) -> None:
        """Raise :class:`RunLockedError` now when a live process holds the lock (nothing is created)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(
                    f"{self.folder} is in use by another run: {describe_holder(_read(fd))}. Wait for it to end (or "
                    f"stop it), or choose another --output_dir") from None
        finally:
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
