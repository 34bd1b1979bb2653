"""SIGINT and SIGTERM for a training process: record the signal, raise at once, and raise again at safe points.

:func:`install` replaces both handlers with one that records the first signal and raises ``KeyboardInterrupt``
(SIGINT) or :class:`Terminated` (SIGTERM). A raise from a signal handler can be lost: Python runs the handler in
whatever code is executing, and some of that code swallows exceptions (``os.fork``'s after-fork hooks, ``__del__``
methods: "Exception ignored in ..."). So the training and evaluation loops call :func:`check` at every batch,
which raises the recorded signal's exception again, and code that sees any failure after a signal
(:func:`pending`) reports it as that interruption: e.g. a DataLoader's "worker exited unexpectedly".

Only the first signal raises; later ones (a second Ctrl-C, torchrun's agent forwarding SIGTERM after the group's
SIGINT) are ignored while the run unwinds, so that the clean-up (the one line, the lock) is not cut short.

Where a raise would be swallowed for sure (starting DataLoader workers: ``os.fork`` runs its after-fork hooks in
the parent, and they ignore exceptions), the code runs in :class:`deferred`: the signal raises when it ends.

The handler does nothing in a forked child (a DataLoader worker inherits it): a signal sent to the whole
process group (a terminal's Ctrl-C, ``kill -- -PGID``, SLURM) then leaves the workers alone (had they died of it,
the main process would fail with "DataLoader worker ... exited unexpectedly", or print "Exception ignored"
from torch's SIGCHLD handler), and the main process shuts them down as it unwinds: the DataLoader tells them to
stop; they also watch their parent and exit within seconds when it is gone.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Dict, Optional

__all__ = ["Terminated", "install", "uninstall", "check", "pending", "exception", "status", "deferred", "worker_init"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by the handler :func:`install` sets: the run unwinds as on Ctrl-C."""


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_pending: Optional[int] = None  # the first signal received since install()
_owner: Optional[int] = None  # the pid whose handler this is (a forked child's inherited handler does nothing)
_previous: Dict[int, Any] = {}
_deferring = 0  # > 0 inside deferred(): the handler records the signal and the block's end raises it


def exception(signum: Optional[int] = None) -> KeyboardInterrupt:
    """The exception of ``signum`` (default: the pending signal): :class:`Terminated` or ``KeyboardInterrupt``."""
    signum = _pending if signum is None else signum
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def status(e: BaseException) -> int:
    """The exit status of an interruption: 143 (SIGTERM) or 130 (SIGINT), as a shell reports them; of the signal
    received, else of ``e`` (a ``KeyboardInterrupt`` raised otherwise)."""
    if _pending is not None:
        return 143 if _pending == signal.SIGTERM else 130
    return 143 if isinstance(e, Terminated) else 130


def _ignore_sigchld(signum: int, frame: Any) -> None:
    """SIGCHLD once the run is ending (see :func:`_handler`)."""


def _handler(signum: int, frame: Any) -> None:
    global _pending
    if os.getpid() != _owner:  # a forked DataLoader worker: the main process decides
        return
    if _pending is not None:  # already unwinding
        return
    _pending = signum
    # torch's SIGCHLD handler raises "DataLoader worker ... is killed by signal" at any later moment (in
    # clean-up code, in __del__ at exit) if a worker died of the group's signal all the same (in the instant
    # before worker_init ran): the run is ending, and a dead worker is then reported by the loader itself
    # (a Python no-op, not SIG_DFL: a SIGCHLD already pending would then be reported by Python as "Signal 17
    # ignored due to race condition")
    if signal.getsignal(signal.SIGCHLD) not in (None, signal.SIG_DFL, signal.SIG_IGN, _ignore_sigchld):
        signal.signal(signal.SIGCHLD, _ignore_sigchld)
    if not _deferring:
        raise exception(signum)


def install() -> None:
    """Handle SIGINT and SIGTERM in this process (from the main thread), forgetting any earlier signal."""
    global _pending, _owner
    _pending, _owner = None, os.getpid()
    for s in _SIGNALS:
        prev = signal.signal(s, _handler)
        _previous.setdefault(s, prev)


def uninstall() -> None:
    """Put back the handlers :func:`install` replaced."""
    global _owner
    for s, prev in list(_previous.items()):
        signal.signal(s, prev)
    _previous.clear()
    _owner = None


def pending() -> Optional[int]:
    """The signal received since :func:`install`, or ``None``."""
    return _pending


def check() -> None:
    """Raise the pending signal's exception (a safe point: once per batch); nothing if none came."""
    if _pending is not None and os.getpid() == _owner:
        raise exception()


class deferred:
    """A block in which a signal does not raise (it is recorded, and raised when the block ends): for code that
    would swallow the exception, such as starting DataLoader workers (``os.fork`` runs its after-fork hooks,
    which ignore exceptions, in the parent)."""

    def __enter__(self) -> "deferred":
        global _deferring
        _deferring += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        global _deferring
        _deferring -= 1
        if exc[0] is None and not _deferring:
            check()


def worker_init(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGINT, and SIGTERM unless its parent sent it.

    A signal sent to the process group reaches the workers too; had they died of it, the main process would
    fail with "DataLoader worker ... exited unexpectedly" or "... is killed by signal" instead of ending with its
    one line. torch's own SIGTERM handler in a worker exits quietly when the parent sends SIGTERM (the loader's
    last resort to stop a worker) and dies of any other; here a thread waits for SIGTERM and keeps the first
    part only. The workers end when the main process shuts the loader down, or within seconds of its death
    (they watch their parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS has no sigwaitinfo: SIGTERM keeps torch's handler there
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_sigterm() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == os.getppid():
                os._exit(0)

    threading.Thread(target=wait_for_sigterm, name="sigterm", daemon=True).start()
