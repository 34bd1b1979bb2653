"""Tie a process's life to its parent's: :func:`exit_with_parent` (Linux ``prctl(PR_SET_PDEATHSIG)``).

A leaf (standard library only): torchrun workers call it (:mod:`utils.distributed`), and ``tools/run_table.py``
calls it in each launcher it starts, so that a ``kill -9`` of the parent cannot leave training processes behind.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["exit_with_parent"]


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``; kept across
    ``exec``, so it reaches the program a launcher execs).

    Under ``torchrun`` the parent is the launcher's agent: a ``kill -9`` of the agent (or of the launcher, whose
    PID the agent is) cannot be forwarded to the workers, which would otherwise keep training as orphans (torchrun
    itself forwards SIGTERM/SIGINT). Returns whether the request was made (False off Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(sig), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the parent died before the request: nobody will signal us
        os.kill(os.getpid(), sig)
    return True
