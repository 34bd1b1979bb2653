"""The plan of a table: which launchers, what each would run (a dry run read back with train.py's own flag
parser), where it runs, and what its folder already holds (finished, resumable, stale, in use elsewhere,
recorded with other settings).

Light: the standard library, ``yaml``, ``data.benchmarks`` and train.py's own parser (``cli.flags``, with the
method registry ``methods``), none of which imports torch; the parser is reached through
:func:`parse_train_flags` only.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from cli.flags import parse_args, resolved_method
from data.benchmarks import get_benchmark
from utils.frozen import thaw

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
# train.py flags that change where or how fast a run goes, not what it trains or measures: a finished or
# interrupted run recorded with other values of these is still the requested run. --amp / --amp_dtype are here
# because config.yaml records the precision the device allowed (train.py itself checks a resumed run's precision).
RUN_ONLY_FLAGS = frozenset((
    "config", "data_dir", "load_path", "num_workers", "prefetcher", "check_images", "batch_size_test", "device",
    "output_dir", "resume", "checkpoint", "delta_folder", "tensorboard", "find_unused_parameters", "cache_dir",
    "cache_storage", "allow_backbone_mismatch", "amp", "amp_dtype",
))


class TableError(ValueError):
    """Bad input, reported before anything runs."""


@dataclass
class RunSpec:
    """One launcher of the table and where it runs."""

    name: str  # folder relative to the output root
    launcher: str  # absolute path
    out_dir: str  # absolute path
    extra: List[str] = field(default_factory=list)  # flags after '--'
    env: Dict[str, str] = field(default_factory=dict)  # environment for the launcher (on top of os.environ)
    settings: Dict[str, Any] = field(default_factory=dict)  # the train.py flags it resolves to (name -> value)


def parse_train_flags(argv: Sequence[str]) -> Tuple[argparse.Namespace, str]:
    """train.py's own parsing of a launcher's arguments, and the resolved method (``dtl+`` for DTL with a
    fusion size). Every use of train.py's parser in run_table goes through here."""
    args = parse_args(list(argv))
    return args, resolved_method(args)


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
    """Refuse flags after ``--`` that run_table sets itself."""
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
    """benchmark, dataset, method, shot, model, data_dir, load_path of a launcher, and ``settings`` (every
    resolved train.py flag), from train.py's own parser."""
    argv = dry_run(launcher, extra, env)
    try:
        args, method = parse_train_flags(argv)
    except SystemExit:
        raise TableError(f"{launcher}: train.py rejects its flags (see the message above): {' '.join(argv)}") from None
    except ValueError as e:  # UsageError
        raise TableError(f"{launcher}: {e}") from None
    settings = {k: thaw(v) for k, v in vars(args).items()}
    return dict(benchmark=args.benchmark, dataset=args.dataset, method=method, shot=getattr(args, "shot", None),
                model=args.model, data_dir=args.data_dir, load_path=args.load_path, settings=settings)


def run_name(d: Dict[str, Any]) -> str:
    """``<backbone>/<benchmark>/<dataset>/<method>[_shot_<k>]``."""
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
                             env=dict(env), settings=d["settings"]))
    return specs


# ------------------------------------------------------------------------------------------------ folders
def run_state(out_dir: str) -> str:
    """``done`` (results.json), ``partial`` (last.pth), ``stale`` (a run folder without a checkpoint) or ``new``."""
    if os.path.isfile(os.path.join(out_dir, "results.json")):
        return "done"
    if os.path.isfile(os.path.join(out_dir, "last.pth")):
        return "partial"
    if any(os.path.exists(os.path.join(out_dir, n)) for n in ("summary.csv", "config.yaml")):
        return "stale"
    return "new"


def holder(out_dir: str) -> Optional[str]:
    """Who holds the folder's lock (``.lock``, :mod:`utils.runlock`: a live train.py or run_table, here or
    elsewhere), or ``None`` when it is free."""
    # imported here: a SLURM job unpickles this function before it puts the repository on sys.path
    from utils.runlock import LOCK_NAME, RunLock, RunLockedError, describe_holder

    try:
        RunLock(out_dir).check_free()
    except RunLockedError:
        try:
            with open(os.path.join(out_dir, LOCK_NAME), encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError):
            info = None
        return describe_holder(info if isinstance(info, dict) else None)
    return None


def lock_root(root: str):
    """Hold the output root's lock (``OUTPUT_ROOT/.lock``) for this run_table; :class:`TableError` naming the
    holder when another live run_table has it. Returns the held :class:`~utils.runlock.RunLock`."""
    from utils.runlock import RunLock, RunLockedError

    lock = RunLock(root)
    try:
        lock.acquire()
    except RunLockedError:
        raise TableError(f"{root} is in use by another run_table ({holder(root) or 'a live process'}); wait for "
                         f"it to end (or stop it), or choose another --output_root") from None
    return lock


def recorded_settings(out_dir: str) -> Optional[Dict[str, Any]]:
    """The resolved train.py flags of the run in the folder (its config.yaml), or ``None`` when unreadable."""
    try:
        with open(os.path.join(out_dir, "config.yaml"), encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _canonical_dataset(settings: Dict[str, Any]) -> Any:
    try:
        return get_benchmark(str(settings.get("benchmark"))).canonical_dataset(str(settings.get("dataset")))
    except ValueError:
        return settings.get("dataset")


def setting_differences(spec: RunSpec) -> List[str]:
    """The train.py flags whose recorded value (the folder's config.yaml) differs from the requested one,
    ``--flag: recorded A, requested B`` (flags in :data:`RUN_ONLY_FLAGS` are not compared); [] when equal or
    when nothing is recorded."""
    saved = recorded_settings(spec.out_dir)
    if saved is None or not spec.settings:
        return []
    diffs = []
    for k in sorted(set(saved) & set(spec.settings) - RUN_ONLY_FLAGS):
        a, b = thaw(saved[k]), spec.settings[k]
        if k == "dataset":
            a, b = _canonical_dataset(saved), _canonical_dataset(spec.settings)
        if a != b:
            diffs.append(f"--{k}: recorded {a!r}, requested {b!r}")
    return diffs


@dataclass
class Prepared:
    """What to do with one run: ``command`` to start it, or why not (``skip``: finished with the requested
    settings; ``busy``: the folder's lock is held by a live process)."""

    command: Optional[List[str]] = None
    skip: str = ""
    busy: str = ""


def check_settings(specs: Sequence[RunSpec], rerun_changed: bool) -> List[str]:
    """Refuse (or, with ``rerun_changed``, list for moving aside) the finished or interrupted runs recorded with
    other settings than requested; returns the names to move aside. Folders in use elsewhere are left alone."""
    changed: List[Tuple[RunSpec, str, List[str]]] = []
    for s in specs:
        state = run_state(s.out_dir)
        if state in ("done", "partial") and holder(s.out_dir) is None:
            diffs = setting_differences(s)
            if diffs:
                changed.append((s, state, diffs))
    if changed and not rerun_changed:
        first, state, diffs = changed[0]
        what = "finished" if state == "done" else "interrupted (last.pth)"
        more = f" (and {len(changed) - 1} more run(s))" if len(changed) > 1 else ""
        raise TableError(f"{first.out_dir} holds a run {what} with other settings: {'; '.join(diffs)}{more}; "
                         f"pass --rerun_changed to move such folders aside (<folder>.prev-<time>) and run them "
                         f"again, or choose another --output_root")
    return [s.name for s, _, _ in changed]


def move_aside(out_dir: str, tag: str) -> str:
    """Rename a run folder to ``<folder>.<tag>-<time>`` (a free name); returns the new path."""
    base = f"{out_dir}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, k = base, 1
    while os.path.exists(aside):
        aside, k = f"{base}-{k}", k + 1
    os.replace(out_dir, aside)
    return aside


def prepare(spec: RunSpec) -> Prepared:
    """What to do with a run: nothing when a live process holds its folder or when it is finished; else the
    launcher command (``--resume`` when there is a last.pth). A folder that holds a run without a checkpoint
    (train.py would refuse it) is moved aside (``<folder>.attempt-<time>``), logs included."""
    who = holder(spec.out_dir)
    if who is not None:
        return Prepared(busy=f"running elsewhere: {who}")
    state = run_state(spec.out_dir)
    if state == "done":
        return Prepared(skip="finished before (results.json)")
    if state == "stale":
        move_aside(spec.out_dir, "attempt")
    os.makedirs(spec.out_dir, exist_ok=True)
    cmd = ["bash", spec.launcher, *spec.extra, "--output_dir", spec.out_dir]
    if state == "partial":
        cmd += ["--resume", os.path.join(spec.out_dir, "last.pth")]
    return Prepared(command=cmd)
