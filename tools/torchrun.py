#!/usr/bin/env python3
"""torchrun with the exit statuses and the short output of ``train.py``: what the launchers run for ``NPROC>1``.

    python tools/torchrun.py --nproc_per_node 2 [torchrun options] -- train.py [train.py flags]

Takes exactly ``python -m torch.distributed.run``'s arguments and runs torchrun's own ``run``; only its endings
change:

* SIGINT/SIGTERM to the agent (a Ctrl-C, a ``kill`` of the launcher, SLURM): exit status 128 + the signal
  (130, 143) without torchrun's traceback; rank 0 has said where the run stopped and how to resume it.
* a failed process (``ChildFailedError``): the failed process's own exit status (2 for an ``error:`` in what
  the user gave, 130/143 for a signal, 1 otherwise; a process killed by a signal: 128 + the signal) and one line
  instead of torchrun's report; the processes have printed their own ``error:`` lines.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence


#: The exit statuses of a process that torchrun's agent itself stopped (SIGTERM) after another one failed.
_STOPPED_BY_AGENT = (-15, 143)


def child_status(exitcodes: Sequence[int]) -> int:
    """The exit status of a run whose failed processes ended with ``exitcodes`` (in the order they failed, then
    rank order; a negative code is a signal, as in ``multiprocessing``): the first failure that is not the
    agent's own SIGTERM to the other processes (a process that failed by itself, e.g. exit 2 for an ``error:``,
    names the cause; the others were stopped because of it), else the first one."""
    failed = [code for code in exitcodes if code]
    own = [code for code in failed if code not in _STOPPED_BY_AGENT]
    code = (own or failed or [1])[0]
    return 128 - code if code < 0 else code


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        order = sorted(e.failures, key=lambda r: (e.failures[r].timestamp, r))  # the order they failed in
        status = child_status([e.failures[r].exitcode for r in order])
        print(f"torchrun: process(es) of rank {', '.join(map(str, sorted(order)))} failed (exit status {status})",
              file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
