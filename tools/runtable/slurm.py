"""The SLURM executor (through submitit): one job array of the unfinished runs, requeued on preemption or
time-out (each task continues from its ``last.pth``); waiting for the array, and the status of a submitted one.

The job code (:class:`SlurmRun` and what it calls in this package) travels by value with the job, so a node
needs only the repository at the same path (for train.py and the launchers) and submitit.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .local import job_env, start, stop_from_handler
from .plan import REPO, RUN_LOG, RunSpec, TableError, holder, prepare, run_state
from .status import Outcome, Progress


class SlurmRun:
    """The job of one array task: run one launcher into its folder (resuming from last.pth when there is one).
    submitit calls :meth:`checkpoint` on preemption or time-out: the launcher is stopped and the same job is
    requeued; the requeued job finds last.pth and resumes."""

    def __init__(self) -> None:
        self._proc = None

    def __getstate__(self) -> Dict[str, Any]:
        return {}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self._proc = None

    def __call__(self, spec: Dict[str, Any]) -> Dict[str, Any]:
        if spec["repo"] not in sys.path:
            sys.path.insert(0, spec["repo"])
        rs = RunSpec(**spec["run"])
        p = prepare(rs)
        if p.command is None:
            return {"name": rs.name, "status": "running elsewhere" if p.busy else "skipped", "detail": p.busy or p.skip}
        t0 = time.time()
        self._proc = start(rs, p.command, spec["env"])
        rc = self._proc.wait()
        self._proc = None
        if rc != 0 or run_state(rs.out_dir) != "done":
            why = f"exit {rc}" if rc != 0 else "exit 0 without results.json"
            raise RuntimeError(f"{rs.name} failed ({why}); log: {os.path.join(rs.out_dir, RUN_LOG)}")
        return {"name": rs.name, "status": "done", "seconds": time.time() - t0}

    def checkpoint(self, spec: Dict[str, Any]):
        import submitit

        if self._proc is not None:
            stop_from_handler(self._proc.pid)
        return submitit.helpers.DelayedSubmission(SlurmRun(), spec)


def parse_slurm_time(text: str) -> int:
    """Minutes from ``MM``, ``HH:MM:SS``, ``MM:SS`` or ``D-HH[:MM[:SS]]`` (SLURM's formats)."""
    t = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise TableError(f"--slurm_time {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    d, a, b, c = m.groups()
    if d is not None:  # D-HH[:MM[:SS]]
        minutes = int(d) * 1440 + int(a) * 60 + int(b or 0) + (1 if c and int(c) else 0)
    elif c is not None:  # HH:MM:SS
        minutes = int(a) * 60 + int(b) + (1 if int(c) else 0)
    elif b is not None:  # MM:SS
        minutes = int(a) + (1 if int(b) else 0)
    else:
        minutes = int(a)
    if minutes < 1:
        raise TableError(f"--slurm_time {text!r}: must be at least one minute")
    return minutes


def _coerce(v: str) -> Any:
    if re.fullmatch(r"-?\d+", v):
        return int(v)
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def make_slurm_executor(root: str, args: argparse.Namespace, passthrough: Dict[str, str]):
    """submitit's SlurmExecutor with the table's parameters (``--slurm_NAME VALUE`` passed through)."""
    import submitit

    if not args.slurm_partition:
        raise TableError("--executor slurm needs --slurm_partition")
    try:
        ex = submitit.SlurmExecutor(folder=os.path.join(root, ".submitit", "%j"),
                                    max_num_timeout=args.slurm_max_timeouts)
    except RuntimeError as e:  # no srun on PATH
        raise TableError(f"--executor slurm: {e}") from None
    params: Dict[str, Any] = dict(partition=args.slurm_partition, time=parse_slurm_time(args.slurm_time),
                                  nodes=1, ntasks_per_node=1, job_name=args.slurm_job_name,
                                  array_parallelism=args.slurm_array_parallelism)
    if args.gpus_per_job > 0:
        params["gpus_per_node"] = args.gpus_per_job
    if args.slurm_account:
        params["account"] = args.slurm_account
    params.update({k: _coerce(v) for k, v in passthrough.items()})
    try:
        ex.update_parameters(**params)
    except ValueError as e:
        raise TableError(f"--slurm_*: {e}") from None
    return ex


def slurm_env(gpus_per_job: int) -> Dict[str, str]:
    """The launcher's environment in a job: NPROC / TORCHRUN_ARGS, and DATA_DIR, LOAD_PATH, PYTHON from here."""
    env = job_env(max(1, gpus_per_job))
    for var in ("DATA_DIR", "LOAD_PATH", "PYTHON"):
        if var in os.environ:
            env[var] = os.environ[var]
    return env


def submit_slurm(specs: Sequence[RunSpec], root: str, args: argparse.Namespace,
                 passthrough: Dict[str, str]) -> Tuple[List[Any], List[RunSpec], Dict[str, Outcome]]:
    """Submit the unfinished runs as one array; returns (jobs, submitted specs, outcomes of the others: finished
    before, or in use by a live process)."""
    left: Dict[str, Outcome] = {}
    todo = []
    for s in specs:
        who = holder(s.out_dir)
        if who is not None:
            left[s.name] = Outcome(s.name, "running elsewhere", detail=f"running elsewhere: {who}")
        elif run_state(s.out_dir) == "done":
            left[s.name] = Outcome(s.name, "skipped", detail="finished before (results.json)")
        else:
            todo.append(s)
    if not todo:
        return [], [], left
    ex = make_slurm_executor(root, args, passthrough)
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__package__])  # the job code travels with the job
    env = slurm_env(args.gpus_per_job)
    payload = [{"run": asdict(s), "env": env, "repo": REPO} for s in todo]
    jobs = ex.map_array(SlurmRun(), payload)
    return jobs, todo, left


def wait_slurm(jobs: Sequence[Any], todo: Sequence[RunSpec], specs: Sequence[RunSpec], left: Dict[str, Outcome],
               slots: int, poll_s: float) -> List[Outcome]:
    """Wait for the array (progress line as for local runs); the outcome of every run."""
    outcomes: Dict[str, Outcome] = dict(left)
    n_left = sum(o.status == "skipped" for o in left.values())
    progress = Progress(len(specs), slots)
    started: Dict[str, float] = {}
    t_submit = time.time()
    while True:
        states = {s.name: j.state for s, j in zip(todo, jobs)}
        finished = {s.name: j.done() for s, j in zip(todo, jobs)}
        for name, st in states.items():
            if st == "RUNNING" and name not in started:
                started[name] = time.time()
        n_done = n_left + sum(finished[s.name] and run_state(s.out_dir) == "done" for s in todo)
        n_failed = sum(finished[s.name] and run_state(s.out_dir) != "done" for s in todo)
        running = [started.get(n, t_submit) for n, st in states.items() if st == "RUNNING"]
        queued = sum(1 for n in states if not finished[n] and states[n] != "RUNNING")
        progress.show(n_done, running, queued, n_failed)
        if all(finished.values()):
            break
        time.sleep(poll_s)
    for s, j in zip(todo, jobs):
        log = os.path.join(s.out_dir, RUN_LOG)
        if run_state(s.out_dir) == "done":
            outcomes[s.name] = Outcome(s.name, "done")
            continue
        who = holder(s.out_dir)
        if who is not None:
            outcomes[s.name] = Outcome(s.name, "running elsewhere", detail=f"running elsewhere: {who}")
            continue
        err = j.exception()
        outcomes[s.name] = Outcome(s.name, "failed", detail=f"job {j.job_id} {j.state}; log: {log}; "
                                                           f"SLURM log: {j.paths.stderr}"
                                                           + (f"; {str(err).splitlines()[-1]}" if err else ""))
    return [outcomes[s.name] for s in specs]


def collect_outcomes(specs: Sequence[RunSpec], job_ids: Dict[str, str], root: str) -> List[Outcome]:
    """Status of every run from its folder (and, for SLURM runs, from sacct through submitit)."""
    out = []
    for s in specs:
        state = run_state(s.out_dir)
        if state == "done":
            out.append(Outcome(s.name, "done"))
            continue
        detail = f"log: {os.path.join(s.out_dir, RUN_LOG)}" if os.path.exists(os.path.join(s.out_dir, RUN_LOG)) \
            else ""
        status = "not finished" + (" (has last.pth)" if state == "partial" else "")
        who: Optional[str] = holder(s.out_dir)
        if who is not None:
            status, detail = "running", f"running: {who}; " + detail
        jid = job_ids.get(s.name)
        if jid:
            try:
                import submitit

                job = submitit.SlurmJob(folder=os.path.join(root, ".submitit", "%j"), job_id=jid)
                st = job.state
                status = "failed" if job.done() else st.lower()
                detail = f"job {jid} {st}; " + detail
            except Exception as e:  # sacct missing or unreachable: report what the folder says
                detail = f"job {jid} (state unknown: {type(e).__name__}); " + detail
        out.append(Outcome(s.name, status, detail=detail))
    return out
