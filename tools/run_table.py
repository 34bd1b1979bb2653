#!/usr/bin/env python3
"""Run many launchers -- a whole table of the paper -- on this machine or on a SLURM cluster, then collect it.

    python tools/run_table.py --set vit-vtab --output_root runs/vit-vtab                    # one box, all GPUs
    python tools/run_table.py train_scripts/vit/vtab/*/train_dtl.sh --output_root runs/t --slots 4 --gpus_per_job 2
    python tools/run_table.py --set vit-few-shot --output_root runs/fs --executor slurm \\
        --slurm_partition gpu --slurm_time 12:00:00 --gpus_per_job 1 --slurm_array_parallelism 16 --no_wait
    python tools/run_table.py --output_root runs/fs --collect      # later: status + table of a submitted table
    python tools/run_table.py ... -- --epochs 1                    # flags after '--' go to every launcher

Each launcher runs into ``OUTPUT_ROOT/<backbone>/<benchmark>/<dataset>/<method>[_shot_k]`` (``backbone`` =
the ``--model`` the launcher passes, so ViT and Swin runs of one task never share a folder). ``DATA_DIR``,
``LOAD_PATH`` (and ``PYTHON``) come from the environment, as for a launcher run by hand. Every launcher is
dry-run first (its train.py flags read back with train.py's own parser), so a bad flag, a launcher still
holding its placeholder paths, or two launchers that would share a folder fail before anything starts.

* A run whose folder holds ``results.json`` is skipped; one holding ``last.pth`` continues with ``--resume``;
  a folder left by a run that died before its first checkpoint is moved aside (``<folder>.attempt-<time>``).
* ``--executor local`` (default): ``--slots`` runs at a time, each with its own ``--gpus_per_job`` GPUs
  (``CUDA_VISIBLE_DEVICES``; ``NPROC`` = GPUs per job, so a launcher uses torchrun for more than one). Without
  GPUs the slots are CPU processes (``OMP_NUM_THREADS`` split between them unless set). A failed run does not
  stop the others; Ctrl-C stops all runs (they resume next time).
* ``--executor slurm``: one job array through submitit (``--slurm_partition``, ``--slurm_time``,
  ``--slurm_account``, ``--gpus_per_job``, ``--slurm_array_parallelism``; any other ``--slurm_NAME VALUE`` is
  submitit's SlurmExecutor parameter NAME, e.g. ``--slurm_mem 64G --slurm_qos high --slurm_cpus_per_task 8``).
  A preempted or timed-out job is requeued (submitit's checkpointing) and continues from its ``last.pth``.
  Without ``--no_wait`` the command waits for the array; with it, it prints the job ids and the command that
  collects the table later.

While it runs, a progress line (done, running, queued, failed, ETA); at the end a status table (also
``OUTPUT_ROOT/status.md``), and ``tools/aggregate.py --paper``'s tables in ``OUTPUT_ROOT/table.md`` (+ CSV
files beside it): the paper's number and our difference beside every cell that has one. Each run's launcher
output goes to ``<run folder>/run_table.log``. ``OUTPUT_ROOT/run_table.json`` records the runs (and SLURM job
ids) for ``--collect``. Exit status: 0 when every run finished, 1 when any failed (or, for ``--collect``, is
not finished), 2 for bad input, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from data.benchmarks import get_benchmark  # noqa: E402  (light: no torch)
from utils.atomic import atomic_write_json, atomic_write_text  # noqa: E402

SETS = {
    "vit-vtab": "train_scripts/vit/vtab/*/train_dtl*.sh",
    "swin-vtab": "train_scripts/swin/vtab/*/train_dtl*.sh",
    "vit-few-shot": "train_scripts/vit/few_shot/*/train_dtl*_shot_*.sh",
    "vit-dg": "train_scripts/vit/domain_generalization/*/train_dtl*.sh",
}
MANIFEST = "run_table.json"
RUN_LOG = "run_table.log"
# train.py flags that run_table sets itself
OWN_FLAGS = ("--output_dir", "--resume", "--eval_only", "--checkpoint")
PLACEHOLDER = "/path/to/"


class TableError(ValueError):
    """Bad input, reported before anything runs."""


# ------------------------------------------------------------------------------------------------ the runs
@dataclass
class RunSpec:
    """One launcher of the table and where it runs."""

    name: str  # folder relative to the output root
    launcher: str  # absolute path
    out_dir: str  # absolute path
    extra: List[str] = field(default_factory=list)  # flags after '--'
    env: Dict[str, str] = field(default_factory=dict)  # environment for the launcher (on top of os.environ)


def expand_launchers(patterns: Sequence[str], sets: Sequence[str]) -> List[str]:
    """Launcher paths from shell globs and named sets, in order, each once (absolute)."""
    out: List[str] = []
    for s in sets:
        if s not in SETS:
            raise TableError(f"--set {s}: unknown set (known: {', '.join(SETS)})")
        hits = sorted(glob.glob(os.path.join(REPO, SETS[s])))
        if not hits:
            raise TableError(f"--set {s}: no launcher matches {SETS[s]}")
        out += hits
    for p in patterns:
        hits = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not hits:
            raise TableError(f"{p}: no launcher matches")
        for h in hits:
            if not os.path.isfile(h):
                raise TableError(f"{h}: launcher not found")
        out += hits
    seen, uniq = set(), []
    for p in out:
        a = os.path.abspath(p)
        if a not in seen:
            seen.add(a)
            uniq.append(a)
    return uniq


def check_extra(extra: Sequence[str]) -> None:
    for a in extra:
        flag = a.split("=", 1)[0]
        if flag in OWN_FLAGS:
            raise TableError(f"{flag} after '--': run_table chooses each run's folder and resumes by itself "
                             f"(use --output_root)")


def dry_run(launcher: str, extra: Sequence[str], env: Dict[str, str]) -> List[str]:
    """The train.py arguments a launcher would pass (it runs with a recording stand-in for Python)."""
    with tempfile.TemporaryDirectory(prefix="run_table_") as tmp:
        rec = os.path.join(tmp, "python")
        out = os.path.join(tmp, "argv")
        with open(rec, "w") as f:
            f.write('#!/bin/sh\nprintf \'%s\\0\' "$@" > "$RUN_TABLE_ARGV"\n')
        os.chmod(rec, 0o755)
        e = dict(os.environ, **env)
        e.update(PYTHON=rec, RUN_TABLE_ARGV=out, NPROC="1")
        e.pop("TORCHRUN_ARGS", None)
        proc = subprocess.run(["bash", launcher, *extra], env=e, capture_output=True, text=True, timeout=60,
                              cwd=tmp)
        if proc.returncode != 0 or not os.path.exists(out):
            raise TableError(f"{launcher}: the launcher failed before starting train.py (exit {proc.returncode}): "
                             f"{proc.stderr.strip()[-500:]}")
        with open(out, "rb") as f:
            argv = f.read().decode().split("\0")[:-1]
    idx = [i for i, a in enumerate(argv) if os.path.basename(a) == "train.py"]
    if not idx:
        raise TableError(f"{launcher}: does not start train.py (arguments: {' '.join(argv[:6])} ...)")
    return argv[idx[0] + 1:]


def describe(launcher: str, extra: Sequence[str], env: Dict[str, str]) -> Dict[str, Any]:
    """benchmark, dataset, method, shot, model, data_dir, load_path of a launcher (train.py's own parser)."""
    from cli.specs import parse_args, resolved_method  # here: it imports torch, which --collect does not need

    argv = dry_run(launcher, extra, env)
    try:
        args = parse_args(argv)
    except SystemExit:
        raise TableError(f"{launcher}: train.py rejects its flags (see the message above): {' '.join(argv)}") from None
    except ValueError as e:  # UsageError
        raise TableError(f"{launcher}: {e}") from None
    return dict(benchmark=args.benchmark, dataset=args.dataset, method=resolved_method(args),
                shot=getattr(args, "shot", None), model=args.model, data_dir=args.data_dir,
                load_path=args.load_path)


def run_name(d: Dict[str, Any]) -> str:
    method = get_benchmark(d["benchmark"]).run_name(d["method"], d["shot"])
    model = re.sub(r"[^A-Za-z0-9_.+-]", "_", str(d["model"]))
    return os.path.join(model, d["benchmark"], d["dataset"], method)


def plan_runs(launchers: Sequence[str], root: str, extra: Sequence[str], env: Dict[str, str],
              check_paths: bool = True, check_placeholders: bool = True) -> List[RunSpec]:
    """Dry-run every launcher; refuse placeholders, missing data (``check_paths``: paths seen from this
    machine), and two launchers sharing a folder."""
    specs: List[RunSpec] = []
    by_name: Dict[str, str] = {}
    for launcher in launchers:
        d = describe(launcher, extra, env)
        for var, key in (("DATA_DIR", "data_dir"), ("LOAD_PATH", "load_path")):
            if check_placeholders and str(d[key]).startswith(PLACEHOLDER):
                raise TableError(f"{launcher}: {var} is the launcher's placeholder {d[key]}; set {var} in the "
                                 f"environment (or edit the launcher)")
        if not os.path.isdir(d["data_dir"]):
            if check_paths:
                raise TableError(f"{launcher}: DATA_DIR {d['data_dir']} is not a folder")
            if check_placeholders:
                print(f"run_table: warning: DATA_DIR {d['data_dir']} is not a folder on this machine "
                      f"({os.path.basename(launcher)}); the jobs must see it", file=sys.stderr)
        if check_paths and d["load_path"] and d["load_path"] != "timm" and not os.path.exists(d["load_path"]):
            raise TableError(f"{launcher}: LOAD_PATH {d['load_path']} not found")
        name = run_name(d)
        if name in by_name:
            raise TableError(f"{launcher} and {by_name[name]} would both run into {name}")
        by_name[name] = launcher
        specs.append(RunSpec(name=name, launcher=launcher, out_dir=os.path.join(root, name), extra=list(extra),
                             env=dict(env)))
    return specs


def run_state(out_dir: str) -> str:
    """``done`` (results.json), ``partial`` (last.pth), ``stale`` (a run folder without a checkpoint) or ``new``."""
    if os.path.isfile(os.path.join(out_dir, "results.json")):
        return "done"
    if os.path.isfile(os.path.join(out_dir, "last.pth")):
        return "partial"
    if any(os.path.exists(os.path.join(out_dir, n)) for n in ("summary.csv", "config.yaml")):
        return "stale"
    return "new"


def prepare(spec: RunSpec) -> Optional[List[str]]:
    """The launcher command for a run, or ``None`` when it is finished. A folder that holds a run without a
    checkpoint (train.py would refuse it) is moved aside, logs included."""
    state = run_state(spec.out_dir)
    if state == "done":
        return None
    if state == "stale":
        aside = f"{spec.out_dir}.attempt-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(spec.out_dir, aside)
    os.makedirs(spec.out_dir, exist_ok=True)
    cmd = ["bash", spec.launcher, *spec.extra, "--output_dir", spec.out_dir]
    if state == "partial":
        cmd += ["--resume", os.path.join(spec.out_dir, "last.pth")]
    return cmd


def start(spec: RunSpec, cmd: List[str], env_extra: Dict[str, str]) -> subprocess.Popen:
    """Start a launcher in its own process group, output appended to the run folder's run_table.log."""
    log = os.path.join(spec.out_dir, RUN_LOG)
    env = dict(os.environ, **spec.env, **env_extra)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"=== run_table {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted({**spec.env, **env_extra}.items()))
                + " " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=REPO, start_new_session=True)


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


# ------------------------------------------------------------------------------------------------ status
@dataclass
class Outcome:
    name: str
    status: str  # done / skipped / failed / interrupted / pending / running
    seconds: Optional[float] = None
    detail: str = ""


def read_top1(out_dir: str) -> str:
    try:
        with open(os.path.join(out_dir, "results.json"), encoding="utf-8") as f:
            r = json.load(f)
        return f"{float(r['top1']):.2f}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _hms(s: Optional[float]) -> str:
    if s is None:
        return ""
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def status_markdown(outcomes: Sequence[Outcome], root: str) -> str:
    lines = ["| run | status | top-1 | time | log / note |", "|---|---|---:|---:|---|"]
    for o in outcomes:
        lines.append(f"| {o.name} | {o.status} | {read_top1(os.path.join(root, o.name))} | {_hms(o.seconds)} | "
                     f"{o.detail} |")
    counts: Dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    return "\n".join(lines) + f"\n\n{len(outcomes)} run(s): {summary}\n"


class Progress:
    """One line per change (and at most every ``every_s`` otherwise): done, running, queued, failed, ETA."""

    def __init__(self, total: int, slots: int, stream=None, every_s: float = 60.0) -> None:
        self.total, self.slots, self.every_s = total, max(1, slots), every_s
        self.stream = stream or sys.stderr
        self.durations: List[float] = []
        self.last: Tuple = ()
        self.last_t = 0.0

    def eta(self, running_since: Sequence[float], queued: int) -> Optional[float]:
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        now = time.time()
        left_running = [max(0.0, mean - (now - t)) for t in running_since]
        # queued runs go through the slots in waves after the running ones
        return max(left_running + [0.0]) + mean * -(-queued // self.slots)

    def show(self, done: int, running_since: Sequence[float], queued: int, failed: int, force: bool = False) -> None:
        key = (done, len(running_since), queued, failed)
        now = time.time()
        if not force and key == self.last and now - self.last_t < self.every_s:
            return
        self.last, self.last_t = key, now
        eta = self.eta(running_since, queued)
        print(f"[run_table {time.strftime('%H:%M:%S')}] {done}/{self.total} done, {len(running_since)} running, "
              f"{queued} queued, {failed} failed, ETA {_hms(eta) if eta is not None else '?'}",
              file=self.stream, flush=True)


# ------------------------------------------------------------------------------------------------ local
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


def run_local(specs: Sequence[RunSpec], slots: Optional[int], gpus_per_job: int, gpus: Optional[List[str]],
              poll_s: float = 0.5) -> Tuple[List[Outcome], bool]:
    """Run the specs; returns the outcomes and whether a signal (Ctrl-C, SIGTERM) stopped the table."""
    gpus = detect_gpus() if gpus is None else gpus
    if gpus:
        max_slots = len(gpus) // gpus_per_job
        if max_slots < 1:
            raise TableError(f"--gpus_per_job {gpus_per_job}: only {len(gpus)} GPU(s) here ({','.join(gpus)})")
        slots = slots or max_slots
        if slots > max_slots:
            raise TableError(f"--slots {slots} x --gpus_per_job {gpus_per_job} needs {slots * gpus_per_job} GPUs; "
                             f"{len(gpus)} here ({','.join(gpus)})")
        pool = [gpus[i * gpus_per_job:(i + 1) * gpus_per_job] for i in range(slots)]
        print(f"run_table: {slots} slot(s) of {gpus_per_job} GPU(s): "
              + " ".join(",".join(p) for p in pool), file=sys.stderr)
    else:
        slots = slots or 1
        pool = [[] for _ in range(slots)]
        print(f"run_table: no GPU found; {slots} CPU slot(s)", file=sys.stderr)
    cpu_env: Dict[str, str] = {}
    if not gpus and "OMP_NUM_THREADS" not in os.environ:
        cpu_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // slots))

    outcomes: Dict[str, Outcome] = {}
    queue: List[Tuple[RunSpec, List[str]]] = []
    for s in specs:
        cmd = prepare(s)
        if cmd is None:
            outcomes[s.name] = Outcome(s.name, "skipped", detail="finished before (results.json)")
        else:
            queue.append((s, cmd))
    n_skipped = len(outcomes)
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


# ------------------------------------------------------------------------------------------------ slurm
class SlurmRun:
    """The job of one array task: run one launcher into its folder (resuming from last.pth when there is one).
    submitit calls :meth:`checkpoint` on preemption or time-out: the launcher is stopped and the same job is
    requeued; the requeued job finds last.pth and resumes."""

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._proc = None

    def __call__(self, spec: Dict[str, Any]) -> Dict[str, Any]:
        rs = RunSpec(**spec["run"])
        cmd = prepare(rs)
        if cmd is None:
            return {"name": rs.name, "status": "skipped"}
        t0 = time.time()
        self._proc = start(rs, cmd, spec["env"])
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
    env = job_env(max(1, gpus_per_job))
    for var in ("DATA_DIR", "LOAD_PATH", "PYTHON"):
        if var in os.environ:
            env[var] = os.environ[var]
    return env


def submit_slurm(specs: Sequence[RunSpec], root: str, args: argparse.Namespace,
                 passthrough: Dict[str, str]) -> Tuple[List[Any], List[RunSpec]]:
    """Submit the unfinished runs as one array; returns (jobs, submitted specs)."""
    todo = [s for s in specs if run_state(s.out_dir) != "done"]
    if not todo:
        return [], []
    ex = make_slurm_executor(root, args, passthrough)
    import cloudpickle

    if __name__ != "__main__":  # imported (tests, other tools): ship this module's code with the job
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    env = slurm_env(args.gpus_per_job)
    payload = [{"run": asdict(s), "env": env} for s in todo]
    jobs = ex.map_array(SlurmRun(), payload)
    return jobs, todo


def wait_slurm(jobs: Sequence[Any], todo: Sequence[RunSpec], specs: Sequence[RunSpec], slots: int,
               poll_s: float) -> List[Outcome]:
    outcomes: Dict[str, Outcome] = {s.name: Outcome(s.name, "skipped", detail="finished before (results.json)")
                                    for s in specs if s not in todo}
    progress = Progress(len(specs), slots)
    started: Dict[str, float] = {}
    t_submit = time.time()
    while True:
        states = {s.name: j.state for s, j in zip(todo, jobs)}
        finished = {s.name: j.done() for s, j in zip(todo, jobs)}
        for name, st in states.items():
            if st == "RUNNING" and name not in started:
                started[name] = time.time()
        n_done = len(outcomes) + sum(finished[s.name] and run_state(s.out_dir) == "done" for s in todo)
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
        else:
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


# ------------------------------------------------------------------------------------------------ main
def write_manifest(root: str, data: Dict[str, Any]) -> None:
    atomic_write_json(os.path.join(root, MANIFEST), data, indent=1)


def write_text(path: str, text: str) -> None:
    atomic_write_text(path, text)


def finish(outcomes: Sequence[Outcome], root: str) -> int:
    """Status table (printed, status.md) and the aggregated table (table.md + CSV); the exit status."""
    status = status_markdown(outcomes, root)
    write_text(os.path.join(root, "status.md"), "# run_table status\n\n" + status)
    print("\n" + status, end="")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import aggregate

    rc = aggregate.main([root, "--out", os.path.join(root, "table.md"), "--fig_dir", os.path.join(root, "figs"),
                         "--paper", "--skip_bad"])
    if rc != 0:
        print(f"run_table: aggregate.py failed (exit {rc})", file=sys.stderr)
    print(f"\nstatus: {os.path.join(root, 'status.md')}\ntable:  {os.path.join(root, 'table.md')}")
    bad = [o for o in outcomes if o.status not in ("done", "skipped")]
    return 1 if bad or rc != 0 else 0


def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False, epilog=__doc__.split("\n\n", 1)[1],
        usage="%(prog)s LAUNCHER [LAUNCHER ...] --output_root DIR [options] [-- train.py flags]",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("launchers", nargs="*", help="launcher scripts (shell globs allowed)")
    p.add_argument("--set", action="append", default=[], choices=sorted(SETS),
                   help="a named set of launchers (repeatable): " + "; ".join(f"{k} = {v}" for k, v in SETS.items()))
    p.add_argument("--output_root", required=True, help="folder of the runs, the status and the table")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--slots", type=int, default=None,
                   help="local: runs at a time (default: GPUs // --gpus_per_job, or 1 without GPUs)")
    p.add_argument("--gpus_per_job", type=int, default=1, help="GPUs (torchrun processes) per run (default 1)")
    p.add_argument("--gpus", default=None, help="local: GPU ids to use, e.g. 0,1,2,3 (default: all visible)")
    p.add_argument("--poll", type=float, default=None, help="seconds between status checks (local 0.5, slurm 30)")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: the status and the table of the runs recorded in OUTPUT_ROOT/run_table.json "
                        "(or of the launchers given)")
    g = p.add_argument_group("SLURM (--executor slurm, through submitit)")
    g.add_argument("--slurm_partition", default=None)
    g.add_argument("--slurm_time", default="24:00:00", help="per job: minutes, HH:MM:SS or D-HH:MM:SS "
                                                            "(default 24:00:00)")
    g.add_argument("--slurm_account", default=None)
    g.add_argument("--slurm_array_parallelism", type=int, default=256, help="array tasks at a time (default 256)")
    g.add_argument("--slurm_job_name", default="dtl-table")
    g.add_argument("--slurm_max_timeouts", type=int, default=3,
                   help="requeues after a time-out (preemptions are always requeued; default 3)")
    g.add_argument("--no_wait", action="store_true", help="submit, print the job ids and the collect command, return")
    return p


def parse(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str], Dict[str, str]]:
    ours, extra = split_argv(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(ours)
    passthrough: Dict[str, str] = {}
    i = 0
    rest = []
    while i < len(unknown):
        a = unknown[i]
        if a.startswith("--slurm_"):
            key, eq, val = a[len("--slurm_"):].partition("=")
            if not eq:
                if i + 1 >= len(unknown):
                    parser.error(f"{a} needs a value")
                val = unknown[i + 1]
                i += 1
            passthrough[key] = val
        else:
            rest.append(a)
        i += 1
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (train.py flags go after '--')")
    if passthrough and args.executor != "slurm":
        parser.error(f"--slurm_{next(iter(passthrough))} is for --executor slurm")
    if args.slots is not None and args.slots < 1:
        parser.error("--slots must be at least 1")
    if args.gpus_per_job < 0 or (args.gpus_per_job == 0 and args.executor == "local"):
        parser.error("--gpus_per_job must be at least 1 (0 = CPU-only jobs, slurm only)")
    return args, extra, passthrough


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, extra, passthrough = parse(sys.argv[1:] if argv is None else argv)
    root = os.path.abspath(args.output_root)
    try:
        check_extra(extra)
        if args.collect:
            manifest_path = os.path.join(root, MANIFEST)
            job_ids: Dict[str, str] = {}
            if args.launchers or args.set:
                specs = plan_runs(expand_launchers(args.launchers, args.set), root, extra, {}, check_paths=False,
                                  check_placeholders=False)
            elif os.path.isfile(manifest_path):
                with open(manifest_path, encoding="utf-8") as f:
                    man = json.load(f)
                specs = [RunSpec(**r) for r in man["runs"]]
                job_ids = man.get("slurm_jobs", {})
            else:
                raise TableError(f"--collect: {manifest_path} not found; give the launchers")
            outcomes = collect_outcomes(specs, job_ids, root)
            return finish(outcomes, root)
        launchers = expand_launchers(args.launchers, args.set)
        if not launchers:
            raise TableError("no launchers given (paths, globs or --set)")
        specs = plan_runs(launchers, root, extra, {}, check_paths=args.executor == "local")
        os.makedirs(root, exist_ok=True)
        manifest = {"executor": args.executor, "extra": extra, "command": sys.argv if argv is None else list(argv),
                    "runs": [asdict(s) for s in specs]}
        write_manifest(root, manifest)
        print(f"run_table: {len(specs)} run(s) under {root}", file=sys.stderr)
        if args.executor == "local":
            gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus is not None else None
            outcomes, interrupted = run_local(specs, args.slots, args.gpus_per_job, gpus, poll_s=args.poll or 0.5)
            rc = finish(outcomes, root)
            return 130 if interrupted else rc
        jobs, todo = submit_slurm(specs, root, args, passthrough)
        manifest["slurm_jobs"] = {s.name: j.job_id for s, j in zip(todo, jobs)}
        write_manifest(root, manifest)
        collect_cmd = f"python {os.path.relpath(__file__)} --output_root {shlex.quote(root)} --collect"
        if jobs:
            array_id = str(jobs[0].job_id).split("_")[0]
            print(f"run_table: submitted {'array' if len(jobs) > 1 else 'job'} {array_id} ({len(jobs)} task(s); "
                  f"{len(specs) - len(todo)} finished before): "
                  + " ".join(str(j.job_id) for j in jobs))
        else:
            print("run_table: every run is finished; nothing submitted")
        if args.no_wait:
            print(f"collect the table later with:\n  {collect_cmd}")
            return 0
        outcomes = wait_slurm(jobs, todo, specs, args.slurm_array_parallelism, poll_s=args.poll or 30.0)
        return finish(outcomes, root)
    except TableError as e:
        print(f"run_table: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("run_table: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
