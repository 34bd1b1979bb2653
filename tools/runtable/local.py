"""The local executor: ``--slots`` runs at a time on this machine, each with its own GPUs (or CPU threads).

Each launcher runs in its own process group (Ctrl-C / SIGTERM of the table stops every run, SIGTERM then
SIGKILL to the group) and asks Linux to end it when run_table dies in any way (``kill -9`` included:
:func:`utils.lifetime.exit_with_parent`, kept across the launcher's ``exec`` of train.py / torchrun).
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .plan import REPO, RUN_LOG, RunSpec, TableError, holder, prepare, run_state
from .status import Outcome, Progress


def start(spec: RunSpec, cmd: List[str], env_extra: Dict[str, str]) -> subprocess.Popen:
    """Start a launcher in its own process group, output appended to the run folder's run_table.log; it ends
    when this process does."""
    # imported here: a SLURM job unpickles this function before it puts the repository on sys.path
    from utils.lifetime import exit_with_parent

    log = os.path.join(spec.out_dir, RUN_LOG)
    env = dict(os.environ, **spec.env, **env_extra)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"=== run_table {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted({**spec.env, **env_extra}.items()))
                + " " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=REPO, start_new_session=True, preexec_fn=exit_with_parent)


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the run's process group, SIGKILL after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_from_handler(pid: int, grace_s: float = 20.0) -> None:
    """:func:`stop` for a signal handler that interrupted ``Popen.wait`` (whose lock it cannot take): SIGTERM
    to the process group, reap the launcher directly, SIGKILL after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                return
            time.sleep(0.1)


def job_env(gpus_per_job: int) -> Dict[str, str]:
    """NPROC for the launcher; torchrun --standalone (a free port) for several processes unless the user set
    TORCHRUN_ARGS."""
    env = {"NPROC": str(gpus_per_job)}
    if gpus_per_job > 1 and not os.environ.get("TORCHRUN_ARGS"):
        env["TORCHRUN_ARGS"] = "--standalone"
    return env


def detect_gpus() -> List[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else ``nvidia-smi -L``; [] without GPUs."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [g.strip() for g in cvd.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


def _slots(slots: Optional[int], gpus_per_job: int, gpus: List[str]) -> Tuple[int, List[List[str]]]:
    """The number of slots and each slot's GPUs (empty lists without GPUs)."""
    if not gpus:
        slots = slots or 1
        print(f"run_table: no GPU found; {slots} CPU slot(s)", file=sys.stderr)
        return slots, [[] for _ in range(slots)]
    max_slots = len(gpus) // gpus_per_job
    if max_slots < 1:
        raise TableError(f"--gpus_per_job {gpus_per_job}: only {len(gpus)} GPU(s) here ({','.join(gpus)})")
    slots = slots or max_slots
    if slots > max_slots:
        raise TableError(f"--slots {slots} x --gpus_per_job {gpus_per_job} needs {slots * gpus_per_job} GPUs; "
                         f"{len(gpus)} here ({','.join(gpus)})")
    pool = [gpus[i * gpus_per_job:(i + 1) * gpus_per_job] for i in range(slots)]
    print(f"run_table: {slots} slot(s) of {gpus_per_job} GPU(s): " + " ".join(",".join(p) for p in pool),
          file=sys.stderr)
    return slots, pool


def run_local(specs: Sequence[RunSpec], slots: Optional[int], gpus_per_job: int, gpus: Optional[List[str]],
              poll_s: float = 0.5) -> Tuple[List[Outcome], bool]:
    """Run the specs; returns the outcomes and whether a signal (Ctrl-C, SIGTERM) stopped the table."""
    gpus = detect_gpus() if gpus is None else gpus
    slots, pool = _slots(slots, gpus_per_job, gpus)
    cpu_env: Dict[str, str] = {}
    if not gpus and "OMP_NUM_THREADS" not in os.environ:
        cpu_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // slots))

    outcomes: Dict[str, Outcome] = {}
    queue: List[Tuple[RunSpec, List[str]]] = []
    for s in specs:
        p = prepare(s)
        if p.command is not None:
            queue.append((s, p.command))
        elif p.busy:
            outcomes[s.name] = Outcome(s.name, "running elsewhere", detail=p.busy)
            print(f"run_table: {s.name} is {p.busy}; left alone", file=sys.stderr)
        else:
            outcomes[s.name] = Outcome(s.name, "skipped", detail=p.skip)
    n_skipped = sum(o.status == "skipped" for o in outcomes.values())
    progress = Progress(len(specs), slots)
    running: Dict[int, Tuple[RunSpec, subprocess.Popen, float]] = {}  # slot -> run
    stopping = {"sig": None}

    def on_signal(signum, frame):  # noqa: ARG001
        stopping["sig"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (queue or running) and stopping["sig"] is None:
            for slot in range(slots):
                if slot not in running and queue:
                    spec, cmd = queue.pop(0)
                    who = holder(spec.out_dir)  # again: a queued run may have been started elsewhere since
                    if who is not None:
                        outcomes[spec.name] = Outcome(spec.name, "running elsewhere",
                                                      detail=f"running elsewhere: {who}")
                        continue
                    env = dict(job_env(gpus_per_job if gpus else 1), **cpu_env)
                    if gpus:
                        env["CUDA_VISIBLE_DEVICES"] = ",".join(pool[slot])
                    running[slot] = (spec, start(spec, cmd, env), time.time())
            for slot, (spec, proc, t0) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[slot]
                dt = time.time() - t0
                log = os.path.join(spec.out_dir, RUN_LOG)
                if rc == 0 and run_state(spec.out_dir) == "done":
                    progress.durations.append(dt)
                    outcomes[spec.name] = Outcome(spec.name, "done", dt)
                else:
                    why = f"exit {rc}" if rc != 0 else "exit 0 without results.json"
                    outcomes[spec.name] = Outcome(spec.name, "failed", dt, f"{why}; log: {log}")
                    print(f"run_table: FAILED {spec.name} ({why}); log: {log}", file=sys.stderr, flush=True)
            n_done = sum(o.status == "done" for o in outcomes.values()) + n_skipped
            n_failed = sum(o.status == "failed" for o in outcomes.values())
            progress.show(n_done, [t for _, _, t in running.values()], len(queue), n_failed)
            if running or queue:
                time.sleep(poll_s)
    finally:
        if running:
            print(f"run_table: stopping {len(running)} run(s) (they resume from last.pth next time)",
                  file=sys.stderr, flush=True)
        for spec, proc, t0 in running.values():
            stop(proc)
            outcomes[spec.name] = Outcome(spec.name, "interrupted", time.time() - t0,
                                          f"log: {os.path.join(spec.out_dir, RUN_LOG)}")
        for s, h in old.items():
            signal.signal(s, h)
    for spec, _ in queue:
        outcomes.setdefault(spec.name, Outcome(spec.name, "not run", detail="interrupted before it started"))
    return [outcomes[s.name] for s in specs], stopping["sig"] is not None
