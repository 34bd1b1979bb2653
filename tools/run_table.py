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
  Skipping and resuming need the settings the folder records (its ``config.yaml``) to equal the requested
  train.py flags (paths, loader and precision flags aside): otherwise the table is refused up front, naming the
  differing flags; ``--rerun_changed`` moves such folders aside (``<folder>.prev-<time>``) and runs them again.
* A run folder whose lock (``.lock``) a live process holds -- its train.py started by another run_table or by
  hand -- is never touched: it is reported ``running elsewhere`` (not a failure; the exit status is 1 as for any
  unfinished run). run_table itself locks ``OUTPUT_ROOT/.lock``: a second run_table on the same root is refused,
  naming the holder. The launchers it starts end with it, even on ``kill -9`` (Linux ``PR_SET_PDEATHSIG``).
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
ids) for ``--collect``. A top-1 from a run that dropped unreadable images (``--skip_bad_images``) is marked ``‡``
in status.md and in the tables. Exit status: 0 when every run finished, 1 when any failed or is not finished
(running elsewhere; for ``--collect``, not finished yet), 2 for bad input, 130 when interrupted.

The parts live in ``tools/runtable/``: ``plan.py`` (launchers, the dry run, train.py's flags, what a folder
holds), ``local.py``, ``slurm.py`` (the executors) and ``status.py`` (status table, aggregated table).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tools.runtable.local import run_local  # noqa: E402
from tools.runtable.plan import (MANIFEST, SETS, RunSpec, TableError, check_extra, check_settings,  # noqa: E402
                                 expand_launchers, lock_root, move_aside, plan_runs)
from tools.runtable.slurm import collect_outcomes, submit_slurm, wait_slurm  # noqa: E402
from tools.runtable.status import finish  # noqa: E402
from utils.atomic import WriteError, atomic_write_json, write_error  # noqa: E402


def write_manifest(root: str, data: Dict[str, object]) -> None:
    atomic_write_json(os.path.join(root, MANIFEST), data, indent=1)


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
    p.add_argument("--rerun_changed", action="store_true",
                   help="a finished or interrupted run recorded (config.yaml) with other train.py flags than "
                        "requested is moved aside to <folder>.prev-<time> and run again (default: refuse, naming "
                        "the flags)")
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


def collect(root: str, args: argparse.Namespace, extra: Sequence[str]) -> int:
    """``--collect``: the status and the table of the recorded (or given) runs; nothing runs."""
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
    return finish(collect_outcomes(specs, job_ids, root), root)


def run(root: str, args: argparse.Namespace, extra: List[str], passthrough: Dict[str, str],
        command: List[str]) -> int:
    """Plan, check the settings of what the folders hold, then run locally or submit (the root is locked)."""
    launchers = expand_launchers(args.launchers, args.set)
    if not launchers:
        raise TableError("no launchers given (paths, globs or --set)")
    specs = plan_runs(launchers, root, extra, {}, check_paths=args.executor == "local")
    for name in check_settings(specs, args.rerun_changed):
        aside = move_aside(os.path.join(root, name), "prev")
        print(f"run_table: {name} was recorded with other settings; moved aside to {aside}", file=sys.stderr)
    runs = [{k: v for k, v in asdict(s).items() if k != "settings"} for s in specs]  # settings: config.yaml's
    manifest = {"executor": args.executor, "extra": extra, "command": command, "runs": runs}
    write_manifest(root, manifest)
    print(f"run_table: {len(specs)} run(s) under {root}", file=sys.stderr)
    if args.executor == "local":
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus is not None else None
        outcomes, interrupted = run_local(specs, args.slots, args.gpus_per_job, gpus, poll_s=args.poll or 0.5)
        rc = finish(outcomes, root)
        return 130 if interrupted else rc
    jobs, todo, left = submit_slurm(specs, root, args, passthrough)
    manifest["slurm_jobs"] = {s.name: j.job_id for s, j in zip(todo, jobs)}
    write_manifest(root, manifest)
    collect_cmd = f"python {os.path.relpath(__file__)} --output_root {shlex.quote(root)} --collect"
    if jobs:
        array_id = str(jobs[0].job_id).split("_")[0]
        print(f"run_table: submitted {'array' if len(jobs) > 1 else 'job'} {array_id} ({len(jobs)} task(s); "
              f"{len(specs) - len(todo)} finished before or running elsewhere): "
              + " ".join(str(j.job_id) for j in jobs))
    else:
        print("run_table: every run is finished or running elsewhere; nothing submitted")
    if args.no_wait:
        print(f"collect the table later with:\n  {collect_cmd}")
        return 0
    outcomes = wait_slurm(jobs, todo, specs, left, args.slurm_array_parallelism, poll_s=args.poll or 30.0)
    return finish(outcomes, root)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, extra, passthrough = parse(sys.argv[1:] if argv is None else argv)
    root = os.path.abspath(args.output_root)
    lock = None
    try:
        check_extra(extra)
        if args.collect:
            return collect(root, args, extra)
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            raise write_error(root, e) from e
        lock = lock_root(root)
        return run(root, args, extra, passthrough, sys.argv if argv is None else list(argv))
    except TableError as e:
        print(f"run_table: error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:
        print(f"run_table: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("run_table: interrupted", file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
