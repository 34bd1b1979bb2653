"""The run folder, shared by training and ``--eval_only``, and the resume state kept in its ``last.pth``.

Folder: ``log.txt`` (appended), ``config.yaml`` (the resolved flags, usable as ``--config``, and under ``specs``
the run's four spec sections), ``summary.csv`` (one row per epoch),
TensorBoard events, ``last.pth`` (:class:`ResumeState`, rewritten after every epoch), ``partial/`` (the deltas
of finished seeds) and -- only when the whole run succeeds -- ``delta.pth`` / ``delta_seed<k>.pth`` (with
``--delta_folder`` also ``delta/`` / ``delta_seed<k>/``, delta-only folders of :mod:`models.hub`) and
``results.json``. Only rank 0 writes; every file is written atomically (a failed write: ``could not write
<file>: <reason>``). While a run uses the folder it holds its lock (``.lock``, :mod:`utils.runlock`): a second
run or resume in the same folder is refused, naming the holder.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import yaml

from data.benchmarks import get_benchmark
from models.hub import delta_folder_next_to
from utils.atomic import WriteError, remove_stale_temporaries, write_error
from utils.checkpoint import (
    RESUME_FORMAT, CheckpointError, atomic_write_json, atomic_write_text, capture_rng_state, save_checkpoint,
)
from utils.errors import UsageError
from utils.distributed import DistInfo, all_gather_object, barrier, broadcast_object
from utils.frozen import thaw
from utils.fingerprint import FileFingerprint, describe_change, files_fingerprint
from utils.hashing import file_sha256
from utils.logger import SummaryTable, TensorBoardLogger, add_file_log, format_duration
from utils.metrics import versions
from utils.runlock import RunLock, RunLockedError

from .spec import Experiment, spec_differences

__all__ = ["RunFolder", "ResumeState", "SeedProgress", "CacheInfo", "LEGACY_RESUME_FLAGS", "flag_value",
           "data_fingerprint", "run_is_complete"]

_logger = logging.getLogger("train")

# last.pth files written before the specs hold only the flags: these must be equal when such a file is resumed
# (everything that changed what was trained or measured). Files with specs are compared section by section.
LEGACY_RESUME_FLAGS = (
    "benchmark", "dataset", "shot", "seeds", "target_dataset", "model", "method", "fusion_size", "r", "beta",
    "lora_before_blocks", "add_after_blocks", "drop_path", "img_size", "model_kwargs", "lr", "weight_decay", "epochs",
    "warmup_epochs", "min_lr", "warmup_lr", "batch_size", "mixup", "cutmix", "mixup_prob", "smoothing", "ema",
    "ema_decay", "seed", "eval_interval", "lean", "cache_prefix", "cache_prefix_approx", "cache_dtype",
    "initial_checkpoint",
)


flag_value = thaw  # a JSON-friendly, comparable form of a flag value (tuples become lists)


def flag_values(flags: Mapping[str, Any]) -> Dict[str, Any]:
    """The plain (YAML/JSON) form of a flag record (:attr:`engine.spec.Experiment.flags`)."""
    return {k: flag_value(v) for k, v in flags.items()}


def _file_sha256(path: str) -> Optional[str]:
    try:
        return "sha256:" + file_sha256(path)
    except OSError:
        return None


def _splits(plan) -> Iterator[Tuple[str, Any]]:
    for seed in plan.seeds:
        for name, ds in [("train", seed.train), ("val", seed.val), *[(f"test:{k}", v) for k, v in seed.tests.items()]]:
            if ds is not None:
                yield f"seed {seed.data_seed} {name}", ds


def split_paths(plan) -> Dict[str, List[str]]:
    """The image paths every split of ``plan`` reads, in order (to name a changed file)."""
    return {split: [p for p, _ in getattr(ds, "samples", [])] for split, ds in _splits(plan)}


def data_fingerprint(plan) -> Dict[str, Dict[str, Any]]:
    """A fingerprint of every split of a :class:`data.benchmark.DataPlan`: ``{"seed <k> <split>": {"list": list
    file, "sha256": hash of its content, "images": images used, "classes": class count, "files": the size and
    modification time of every image (:func:`utils.fingerprint.files_fingerprint`, 4 bytes per image)}}``
    (``last.pth`` keeps it, a resume compares it)."""
    out: Dict[str, Dict[str, Any]] = {}
    hashes: Dict[str, Optional[str]] = {}
    files: Dict[int, Dict[str, Any]] = {}  # a dataset shared by seeds (VTAB's test split) is stat-ed once
    for split, ds in _splits(plan):
        lp = getattr(ds, "list_path", None)
        if lp is not None and lp not in hashes:
            hashes[lp] = _file_sha256(lp) if os.path.isfile(lp) else None
        if id(ds) not in files:
            files[id(ds)] = files_fingerprint([p for p, _ in getattr(ds, "samples", [])]).to_dict()
        out[split] = {"list": lp, "sha256": hashes.get(lp) if lp else None, "images": len(ds),
                      "classes": int(getattr(ds, "num_classes", plan.num_classes)), "files": files[id(ds)]}
    return out


def delta_names(data_seed: int, n_seeds: int) -> Tuple[str, str]:
    """(staged, final) paths of a seed's delta, relative to the run folder."""
    return (os.path.join("partial", f"delta_seed{data_seed}.pth"),
            "delta.pth" if n_seeds == 1 else f"delta_seed{data_seed}.pth")


def check_finished_seeds(folder: str, finished: Sequence[int], n_seeds: int, resume_path: str) -> None:
    """Before a resume trains anything: the delta of every finished seed (``finished``: their data seeds) must
    still be in the run folder (staged in ``partial/`` or already published), or the run could never write its
    results. A missing one is refused at once, naming it (:class:`CheckpointError`)."""
    for s in finished:
        staged, final = delta_names(s, n_seeds)
        if not (os.path.isfile(os.path.join(folder, staged)) or os.path.isfile(os.path.join(folder, final))):
            raise CheckpointError(
                f"{os.path.join(folder, staged)}: the delta of finished seed {s} is missing, so {resume_path} can "
                f"never complete the run; restore the file, or start a new run (without --resume)")


def run_is_complete(folder: str, state: "ResumeState", n_seeds: int) -> bool:
    """Whether the run of ``last.pth`` (``state``) in ``folder`` has finished: every seed done, results written."""
    return state.seed_index >= n_seeds and os.path.isfile(os.path.join(folder, "results.json"))


@dataclass
class SeedProgress:
    """Selection state of the seed being trained: the best validation top-1 and its epoch and weights
    (few-shot), and the final evaluation (split -> metrics) once done."""

    best_val: Optional[float] = None
    best_epoch: Optional[int] = None
    best_delta: Optional[Dict[str, Any]] = None
    final: Optional[Dict[str, Dict[str, float]]] = None

    def offer(self, top1: float, epoch: int, delta_fn) -> None:
        """A validation result: strictly better replaces (a tie keeps the earlier weights)."""
        if self.best_val is None or top1 > self.best_val:
            self.best_val, self.best_epoch, self.best_delta = top1, epoch, delta_fn()


@dataclass
class CacheInfo:
    """What results.json reports of ``--cache_prefix``: build seconds over all seeds (not in the epoch times),
    the largest seed's cache size (MiB), its storage and whether it was approximate."""

    build_s: float = 0.0
    mib: Optional[float] = None
    storage: Optional[str] = None
    approximate: Optional[bool] = None


@dataclass
class ResumeState:
    """Everything ``last.pth`` holds; the file is this dataclass as a dict (format ``dtl-resume/1``).

    ``seed_index``/``epoch``: the seed being trained and its completed epochs (after a seed ends: the next seed,
    epoch 0, ``trainer`` None). ``trainer``: model delta and optimiser/schedule/scaler/EMA states.
    ``args``: the flag record; ``specs``: the run's spec sections (:meth:`engine.spec.Experiment.sections`;
    ``None`` in files written before specs). ``completed``: results of the finished seeds. ``counts``: parameter counts. ``cache_info``: the prefix
    cache's build time and size. ``rng_states``: every rank's generators. ``precision``: what training ran in
    (``fp32``/``fp16``/``bf16``; ``None`` in files written before it was recorded). ``memory_peaks``: the CUDA
    memory maxima so far (bytes per phase, :class:`utils.metrics.PeakMemory`).
    """

    args: Dict[str, Any] = field(default_factory=dict)
    specs: Optional[Dict[str, Dict[str, Any]]] = None
    world_size: int = 1
    seed_index: int = 0
    epoch: int = 0
    trainer: Optional[Dict[str, Any]] = None
    progress: Optional[SeedProgress] = None
    completed: List[Dict[str, Any]] = field(default_factory=list)
    summary_rows: List[Dict[str, Any]] = field(default_factory=list)
    train_time_s: float = 0.0
    train_images: int = 0
    counts: Optional[Dict[str, int]] = None
    cache_info: CacheInfo = field(default_factory=CacheInfo)
    rng_states: List[Dict[str, Any]] = field(default_factory=list)
    data_fingerprint: Optional[Dict[str, Dict[str, Any]]] = None
    precision: Optional[str] = None
    memory_peaks: Dict[str, Optional[int]] = field(default_factory=dict)

    def to_checkpoint(self) -> Dict[str, Any]:
        ck = {"format": RESUME_FORMAT}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            ck[f.name] = dataclasses.asdict(v) if isinstance(v, (SeedProgress, CacheInfo)) else v
        return ck

    @classmethod
    def from_checkpoint(cls, ck: Dict[str, Any]) -> "ResumeState":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in ck.items() if k in known and v is not None}
        if kw.get("progress") is not None:
            kw["progress"] = SeedProgress(**kw["progress"])
        if kw.get("cache_info") is not None:
            kw["cache_info"] = CacheInfo(**kw["cache_info"])
        kw["train_time_s"] = float(kw.get("train_time_s", 0.0))
        kw["train_images"] = int(kw.get("train_images", 0))
        kw["seed_index"], kw["epoch"] = int(kw.get("seed_index", 0)), int(kw.get("epoch", 0))
        return cls(**kw)

    def check_matches(self, exp: Experiment, path: str) -> None:
        """A resumed run must use the specs of the interrupted one, section by section (the run-local fields
        aside: :data:`engine.spec.RUN_LOCAL_FIELDS`), including the effective precision and the backbone weights'
        kind and source (their tensors: :meth:`check_weights`). A file written before specs is compared on the
        flags it recorded (:data:`LEGACY_RESUME_FLAGS`)."""
        diffs: List[str] = []
        if self.specs is None:
            _logger.info("note: %s predates the run specs (written by an older version): comparing the flags it "
                         "recorded", path)
            saved, now = self.args, exp.flags
            diffs += [f"--{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in LEGACY_RESUME_FLAGS
                      if k in saved and flag_value(saved.get(k)) != flag_value(now.get(k))]
            if self.precision is not None and exp.run.precision != self.precision:
                diffs.append(_precision_difference(self.precision, exp.run.precision))
            if not diffs and saved.get("load_path") != now.get("load_path"):
                _logger.warning("resuming with --load_path %r (the interrupted run used %r)", now.get("load_path"),
                                saved.get("load_path"))
        else:
            for d in spec_differences(self.specs, exp):
                diffs.append(_precision_difference(d.saved, d.current) if d.field == "precision" else d.describe())
        if diffs:
            raise CheckpointError(f"{path} was written by a run with other settings; resume with the "
                                  f"same flags (or start a new run): " + "; ".join(diffs))
        if self.world_size != exp.run.world_size:
            _logger.warning("resuming a %d-process run with %d processes: the random stream differs from an "
                            "uninterrupted run", self.world_size, exp.run.world_size)

    def check_weights(self, exp: Experiment, path: str) -> None:
        """The backbone tensors of the resumed run (``exp.model.weights.fingerprint``, known once loaded) must be
        those of the interrupted one; a file without specs is not checked."""
        if self.specs is None:
            return
        diffs = [d for d in spec_differences(self.specs, exp, compare_fingerprint=True) if d.field == "weights"]
        if diffs:
            raise CheckpointError(f"{path} was trained on other backbone weights: " + "; ".join(
                d.describe() for d in diffs) + " (resume with the interrupted run's --load_path file)")

    def check_data(self, current: Dict[str, Dict[str, Any]], path: str,
                   paths: Optional[Dict[str, List[str]]] = None) -> None:
        """A resumed run must train and evaluate on the data of the interrupted one (:func:`data_fingerprint`):
        the same lists, and images of the same size and modification time (``paths``: :func:`split_paths`, to
        name the first image that changed)."""
        saved = self.data_fingerprint
        if saved is None:
            _logger.info("note: %s does not record the data it was trained on (written by an older version): the "
                         "data are not checked", path)
            return
        diffs = []
        for split in sorted(set(saved) | set(current)):
            a, b = saved.get(split), current.get(split)
            if a is None or b is None:
                diffs.append(f"{split}: {'not in the interrupted run' if a is None else 'missing now'}")
                continue
            what = []
            if a.get("sha256") != b.get("sha256"):
                what.append(f"list file content differs ({a.get('list')} then, {b.get('list')} now)")
            for key, label in (("images", "images"), ("classes", "classes")):
                if a.get(key) != b.get(key):
                    what.append(f"{label} {a.get(key)} then, {b.get(key)} now")
            if not what and a.get("files") is not None and b.get("files") is not None:
                changed = describe_change(FileFingerprint.from_dict(a["files"]), FileFingerprint.from_dict(b["files"]),
                                          (paths or {}).get(split, ()))
                if changed is not None:
                    what.append(changed)
            if what:
                diffs.append(f"{split}: " + "; ".join(what))
        if diffs:
            raise CheckpointError(f"{path} was trained on other data than the current --data_dir gives: "
                                  + " | ".join(diffs) + " (resume with the data of the interrupted run, or start a "
                                  "new run)")


def _precision_difference(saved: Optional[str], current: Optional[str]) -> str:
    return (f"precision: the checkpoint trained in {saved}, this run would train in {current} ({saved} = "
            f"{_precision_flags(saved)}; resume with the interrupted run's --amp/--amp_dtype on the same kind of "
            f"device)")


def _precision_flags(precision: Optional[str]) -> str:
    return {"fp32": "--no-amp, or --amp with float16 on a CPU", "fp16": "--amp --amp_dtype float16 on CUDA",
            "bf16": "--amp --amp_dtype bfloat16"}.get(precision, precision)


class RunFolder:
    """The folder of one invocation of train.py (see the module docstring); rank 0 writes, all ranks call."""

    def __init__(self, exp: Experiment, dist_info: DistInfo) -> None:
        """``exp``: the run's specs (:meth:`open` takes the final ones, with the loaded weights' fingerprint)."""
        self.exp = exp
        self.dist = dist_info
        self.out_dir = ""
        self.tb = TensorBoardLogger(None)
        self.summary = SummaryTable(None)
        self.lock: Optional[RunLock] = None
        self.data_fingerprint: Optional[Dict[str, Dict[str, Any]]] = None
        self.epoch = 0  # epochs of the current seed in the latest last.pth (rank 0; a resumed run's: set by the caller)
        self.seed_index = 0  # the seed (index in the run's seeds) of the latest last.pth (likewise)

    def open(self, run_name: str, argv: Sequence[str], exp: Experiment,
             summary_rows: Optional[List[Dict[str, Any]]] = None) -> None:
        """Choose and create the folder (``--output_dir``, the resumed run's, or
        ``output/<benchmark>/<dataset>/<run_name>/<time>``) for the run ``exp``; refuse a folder that holds another
        run."""
        self.exp = exp
        run = exp.run
        out, error = None, None
        if self.dist.is_main:
            out, error = self._choose(run_name)
        out, error = broadcast_object((out, error))
        if error is not None:
            raise error
        self.out_dir = out
        if self.dist.is_main:
            try:
                add_file_log(self.path("log.txt"))
            except OSError as e:
                raise write_error(self.path("log.txt"), e) from e
            try:
                self.tb = TensorBoardLogger(self.out_dir if run.tensorboard else None)
            except OSError as e:
                raise write_error(os.path.join(self.out_dir, "events.out.tfevents.*"), e) from e
            if not (run.resume and os.path.exists(self.path("config.yaml"))):
                cfg = {**{k: v for k, v in flag_values(exp.flags).items() if k != "config"}, "specs": exp.sections()}
                note = f"# effective precision: {run.precision}\n" if run.precision else ""
                atomic_write_text(self.path("config.yaml"), "# resolved train.py flags (usable as --config); "
                                  "specs: the run's model/data/optim/run specs\n"
                                  + note + yaml.safe_dump(cfg, sort_keys=False))
            self.summary = SummaryTable(self.path("summary.csv"), summary_rows)
        _logger.info("run folder: %s", self.out_dir)
        _logger.info("command: %s", " ".join([os.path.basename(sys.argv[0])] + list(argv)))

    def precheck(self) -> None:
        """Before anything is built: refuse a named folder (``--output_dir``, a resumed run's) that holds another
        run or that a live process is using (rank 0 checks; creates nothing)."""
        run = self.exp.run
        error = None
        if self.dist.is_main and (run.output_dir or run.resume):
            out = os.path.abspath(run.output_dir or os.path.dirname(os.path.abspath(run.resume)))
            if os.path.exists(out) and not os.path.isdir(out):
                error = f"could not write {out}: it exists and is not a folder (--output_dir)"
            try:
                if error is None:
                    RunLock(out).check_free()
            except RunLockedError as e:
                error = str(e)
            taken = [n for n in ("results.json", "last.pth", "summary.csv") if os.path.exists(os.path.join(out, n))]
            if error is None and taken and not run.resume:
                error = (f"--output_dir {out} already holds a run ({', '.join(taken)}); choose another folder, or "
                         f"continue that run with --resume {os.path.join(out, 'last.pth')}")
        error = broadcast_object(error)
        if error:
            raise UsageError(error)

    def _choose(self, run_name: str) -> Tuple[str, Optional[Exception]]:
        """Create and lock the folder (rank 0); returns it and the error to raise on every rank: a
        :class:`WriteError` when it cannot be created or locked, :class:`RunLockedError` when it is in use, a
        :class:`UsageError` when it holds another run."""
        run, data = self.exp.run, self.exp.data
        if run.output_dir:
            out = run.output_dir
        elif run.resume:
            out = os.path.dirname(os.path.abspath(run.resume))
        else:
            base = os.path.join("output", data.benchmark, data.dataset, run_name,
                                ("eval_" if run.eval_only else "") + time.strftime("%Y%m%d-%H%M%S"))
            out, k = base, 1
            while os.path.exists(out):
                out, k = f"{base}-{k}", k + 1
        out = os.path.abspath(out)
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            return out, write_error(out, e)
        lock = RunLock(out)
        try:
            lock.acquire()
        except RunLockedError as e:
            return out, e
        except OSError as e:
            return out, e if isinstance(e, WriteError) else write_error(lock.path, e)
        self.lock = lock
        taken = [n for n in ("results.json", "last.pth", "summary.csv") if os.path.exists(os.path.join(out, n))]
        if taken and not run.resume:
            self.close()
            return out, UsageError(f"--output_dir {out} already holds a run ({', '.join(taken)}); choose another "
                                   f"folder, or continue that run with --resume {os.path.join(out, 'last.pth')}")
        self._remove_temporaries(out, "left by a killed run")
        return out, None

    @staticmethod
    def _remove_temporaries(out: str, why: str) -> None:
        """Remove the atomic-write temporaries in ``out`` and ``out/partial`` (the caller holds the lock)."""
        removed = remove_stale_temporaries(out) + [
            os.path.join("partial", n) for n in remove_stale_temporaries(os.path.join(out, "partial"))]
        if removed:
            _logger.info("removed %d temporary file(s) %s from %s: %s", len(removed), why, out, ", ".join(removed))

    def close(self) -> None:
        """Release the folder's lock (every exit path of a run calls this)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def log_epoch(self, row: Dict[str, Any], scalars: Dict[str, Optional[float]], step: int) -> None:
        """One epoch: a summary.csv row and TensorBoard scalars."""
        if self.dist.is_main:
            self.summary.add(row)
            self.tb.scalars(scalars, step)

    def save_resume(self, state: ResumeState) -> None:
        """Write ``last.pth`` (every rank calls: the RNG states of all ranks are gathered)."""
        state.rng_states = all_gather_object(capture_rng_state())
        if not self.dist.is_main:
            return
        state.args = flag_values(self.exp.flags)
        state.specs = self.exp.sections()
        state.world_size = self.dist.world_size
        state.summary_rows = self.summary.rows
        if self.data_fingerprint is not None:
            state.data_fingerprint = self.data_fingerprint
        save_checkpoint(state.to_checkpoint(), self.path("last.pth"))
        self.epoch, self.seed_index = state.epoch, state.seed_index

    def _staged(self, data_seed: int) -> str:
        return self.path(delta_names(data_seed, 1)[0])

    def stage_delta(self, data_seed: int, checkpoint: Dict[str, Any]) -> None:
        """Keep a finished seed's delta checkpoint in ``partial/`` until the run succeeds (rank 0)."""
        if self.dist.is_main:
            save_checkpoint(checkpoint, self._staged(data_seed))

    def publish_deltas(self, data_seeds: Sequence[int]) -> None:
        """Move the staged deltas into place: ``delta.pth`` for one seed, ``delta_seed<k>.pth`` for several;
        with ``--delta_folder`` also each as a delta folder next to it (``delta/``, :mod:`models.hub`)."""
        barrier()
        if not self.dist.is_main:
            return
        for s in data_seeds:
            final = self.path(delta_names(s, len(data_seeds))[1])
            if os.path.exists(self._staged(s)):
                try:
                    os.replace(self._staged(s), final)
                except OSError as e:
                    raise write_error(final, e) from e
            elif not os.path.exists(final):
                raise CheckpointError(f"{self._staged(s)}: the delta of seed {s} is missing from the run folder")
            if self.exp.run.delta_folder:  # run/delta/: config.json + delta.safetensors
                delta_folder_next_to(final)
        shutil.rmtree(self.path("partial"), ignore_errors=True)

    def write_results(self, results: Dict[str, Any]) -> None:
        """Complete and write ``results.json``, close TensorBoard and log the summary (rank 0)."""
        if not self.dist.is_main:
            return
        results.update(versions=versions(), args=flag_values(self.exp.flags), specs=self.exp.sections(),
                       output_dir=self.out_dir,
                       world_size=self.dist.world_size, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(self.path("results.json"), results)
        self._remove_temporaries(self.out_dir, "left behind")
        self.tb.close()
        for line in summary_lines(results, self.path("results.json")):
            _logger.info(line)


def _memory_line(res: Dict[str, Any]) -> str:
    def mib(k: str) -> str:
        return "n/a" if res.get(k) is None else "%.0f MiB" % res[k]

    if res.get("peak_memory_run_mib") is None:
        return f"peak GPU memory n/a | peak RSS {res['peak_rss_mib']:.0f} MiB"
    main = "evaluation" if res.get("args", {}).get("eval_only") else "training"
    return (f"peak GPU memory: {main} {mib('peak_memory_mib')} | evaluation {mib('peak_memory_eval_mib')} | "
            f"cache build {mib('peak_memory_cache_build_mib')} | whole run {mib('peak_memory_run_mib')} | "
            f"peak RSS {res['peak_rss_mib']:.0f} MiB")


def summary_lines(res: Dict[str, Any], results_path: str) -> List[str]:
    """The closing lines of the log: accuracy (per seed, per target), parameters, time, memory."""
    lines = [
        "=" * 72,
        f"{res['benchmark']} / {res['dataset']} / {res['method']} on {res['backbone']}"
        + (f" / {res['shot']}-shot" if res.get("shot") and get_benchmark(res["benchmark"]).shot_in_names else ""),
        f"top-1 {res['top1']:.2f}" + (f" +- {res['top1_std']:.2f} (sample std over {len(res['per_seed'])} seeds)"
                                    if res.get("top1_std") is not None else ""),
    ]
    if len(res.get("per_seed", [])) > 1:
        lines.append("per seed: " + ", ".join(f"{s['seed']}: {s['top1']:.2f}" for s in res["per_seed"]))
    for t, v in (res.get("per_target") or {}).items():
        lines.append(f"  {t}: {v['top1']:.2f}")
    lines.append(f"trainable {res['n_trainable']:,} of {res['n_params']:,} "
                 f"(without head {res['n_trainable_excl_head']:,}) | epochs {res['epochs']} | train "
                 f"{format_duration(res['train_time_s'])} | {res.get('precision')}")
    lines.append(_memory_line(res))
    lines.append(f"results: {results_path}")
    lines.append("=" * 72)
    return lines
