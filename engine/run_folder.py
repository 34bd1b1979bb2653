"""The run folder, shared by training and ``--eval_only``, and the resume state kept in its ``last.pth``.

Folder: ``log.txt`` (appended), ``config.yaml`` (the resolved flags), ``summary.csv`` (one row per epoch),
TensorBoard events, ``last.pth`` (:class:`ResumeState`, rewritten after every epoch), ``partial/`` (the deltas
of finished seeds) and -- only when the whole run succeeds -- ``delta.pth`` / ``delta_seed<k>.pth`` (with ``--delta_folder`` also ``delta/`` /
``delta_seed<k>/``, delta-only folders of :mod:`models.hub`) and ``results.json``. Only rank 0 writes; every file is written atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from data.benchmarks import get_benchmark
from models.hub import delta_folder_next_to
from utils.args import UsageError
from utils.checkpoint import (
    RESUME_FORMAT, CheckpointError, atomic_torch_save, atomic_write_json, atomic_write_text, capture_rng_state,
)
from utils.distributed import DistInfo, all_gather_object, barrier, broadcast_object
from utils.logger import SummaryTable, TensorBoardLogger, add_file_log, format_duration
from utils.metrics import versions

__all__ = ["RunFolder", "ResumeState", "SeedProgress", "RESUME_MUST_MATCH", "flag_value"]

_logger = logging.getLogger("train")

# Flags that must be equal when a run is resumed (everything that changes what is trained or measured).
RESUME_MUST_MATCH = (
    "benchmark", "dataset", "shot", "seeds", "target_dataset", "model", "method", "fusion_size", "r", "beta",
    "lora_before_blocks", "add_after_blocks", "drop_path", "img_size", "model_kwargs", "lr", "weight_decay", "epochs",
    "warmup_epochs", "min_lr", "warmup_lr", "batch_size", "mixup", "cutmix", "mixup_prob", "smoothing", "ema",
    "ema_decay", "seed", "eval_interval", "lean", "cache_prefix", "cache_prefix_approx", "cache_dtype",
    "initial_checkpoint",
)


def flag_value(v: Any) -> Any:
    """A JSON-friendly, comparable form of a flag value (tuples become lists)."""
    if isinstance(v, (tuple, list)):
        return [flag_value(x) for x in v]
    if isinstance(v, dict):
        return {k: flag_value(x) for k, x in v.items()}
    return v


def flag_values(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: flag_value(v) for k, v in vars(args).items()}


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
class ResumeState:
    """Everything ``last.pth`` holds; the file is this dataclass as a dict (format ``dtl-resume/1``).

    ``seed_index``/``epoch``: the seed being trained and its completed epochs (after a seed ends: the next seed,
    epoch 0, ``trainer`` None). ``trainer``: model delta and optimiser/schedule/scaler/EMA states.
    ``completed``: results of the finished seeds. ``counts``: parameter counts. ``cache_info``: the prefix
    cache's build time and size. ``rng_states``: every rank's generators.
    """

    args: Dict[str, Any] = field(default_factory=dict)
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
    cache_info: Dict[str, Any] = field(default_factory=lambda: {"build_s": 0.0, "mib": None, "storage": None,
                                                                "approximate": None})
    rng_states: List[Dict[str, Any]] = field(default_factory=list)

    def to_checkpoint(self) -> Dict[str, Any]:
        ck = {"format": RESUME_FORMAT}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            ck[f.name] = dataclasses.asdict(v) if isinstance(v, SeedProgress) else v
        return ck

    @classmethod
    def from_checkpoint(cls, ck: Dict[str, Any]) -> "ResumeState":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in ck.items() if k in known and v is not None}
        if kw.get("progress") is not None:
            kw["progress"] = SeedProgress(**kw["progress"])
        kw["train_time_s"] = float(kw.get("train_time_s", 0.0))
        kw["train_images"] = int(kw.get("train_images", 0))
        kw["seed_index"], kw["epoch"] = int(kw.get("seed_index", 0)), int(kw.get("epoch", 0))
        return cls(**kw)

    def check_matches(self, args: argparse.Namespace, world_size: int, path: str) -> None:
        """A resumed run must use the settings of the interrupted one."""
        saved = self.args
        diffs = [f"--{k}: checkpoint {saved.get(k)!r} vs now {getattr(args, k)!r}"
                 for k in RESUME_MUST_MATCH if k in saved and flag_value(saved.get(k)) != flag_value(getattr(args, k))]
        if diffs:
            raise CheckpointError(f"{path} was written by a run with other settings; resume with the "
                                  f"same flags (or start a new run): " + "; ".join(diffs))
        if saved.get("load_path") != args.load_path:
            _logger.warning("resuming with --load_path %r (the interrupted run used %r)", args.load_path,
                            saved.get("load_path"))
        if self.world_size != world_size:
            _logger.warning("resuming a %d-process run with %d processes: the random stream differs from an "
                            "uninterrupted run", self.world_size, world_size)


class RunFolder:
    """The folder of one invocation of train.py (see the module docstring); rank 0 writes, all ranks call."""

    def __init__(self, args: argparse.Namespace, dist_info: DistInfo) -> None:
        self.args = args
        self.dist = dist_info
        self.out_dir = ""
        self.tb = TensorBoardLogger(None)
        self.summary = SummaryTable(None)

    def open(self, run_name: str, argv: Sequence[str], summary_rows: Optional[List[Dict[str, Any]]] = None) -> None:
        """Choose and create the folder (``--output_dir``, the resumed run's, or
        ``output/<benchmark>/<dataset>/<run_name>/<time>``); refuse a folder that holds another run."""
        args = self.args
        out, error = None, None
        if self.dist.is_main:
            out, error = self._choose(run_name)
        out, error = broadcast_object((out, error))
        if error:
            raise UsageError(error)
        self.out_dir = out
        if self.dist.is_main:
            add_file_log(self.path("log.txt"))
            self.tb = TensorBoardLogger(self.out_dir if args.tensorboard else None)
            if not (args.resume and os.path.exists(self.path("config.yaml"))):
                cfg = {k: v for k, v in vars(args).items() if k != "config"}
                atomic_write_text(self.path("config.yaml"), "# resolved train.py flags (usable as --config)\n"
                                  + yaml.safe_dump(cfg, sort_keys=False))
            self.summary = SummaryTable(self.path("summary.csv"), summary_rows)
        _logger.info("run folder: %s", self.out_dir)
        _logger.info("command: %s", " ".join([os.path.basename(sys.argv[0])] + list(argv)))

    def _choose(self, run_name: str):
        args = self.args
        if args.output_dir:
            out = args.output_dir
        elif args.resume:
            out = os.path.dirname(os.path.abspath(args.resume))
        else:
            base = os.path.join("output", args.benchmark, args.dataset, run_name,
                                ("eval_" if args.eval_only else "") + time.strftime("%Y%m%d-%H%M%S"))
            out, k = base, 1
            while os.path.exists(out):
                out, k = f"{base}-{k}", k + 1
        out = os.path.abspath(out)
        taken = [n for n in ("results.json", "last.pth", "summary.csv") if os.path.exists(os.path.join(out, n))]
        if taken and not args.resume:
            return out, (f"--output_dir {out} already holds a run ({', '.join(taken)}); choose another folder, or "
                         f"continue that run with --resume {os.path.join(out, 'last.pth')}")
        os.makedirs(out, exist_ok=True)
        return out, None

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
        state.args = flag_values(self.args)
        state.world_size = self.dist.world_size
        state.summary_rows = self.summary.rows
        atomic_torch_save(state.to_checkpoint(), self.path("last.pth"))

    def _staged(self, data_seed: int) -> str:
        return self.path(os.path.join("partial", f"delta_seed{data_seed}.pth"))

    def stage_delta(self, data_seed: int, checkpoint: Dict[str, Any]) -> None:
        """Keep a finished seed's delta checkpoint in ``partial/`` until the run succeeds (rank 0)."""
        if self.dist.is_main:
            atomic_torch_save(checkpoint, self._staged(data_seed))

    def publish_deltas(self, data_seeds: Sequence[int]) -> None:
        """Move the staged deltas into place: ``delta.pth`` for one seed, ``delta_seed<k>.pth`` for several;
        with ``--delta_folder`` also each as a delta folder next to it (``delta/``, :mod:`models.hub`)."""
        barrier()
        if not self.dist.is_main:
            return
        for s in data_seeds:
            final = self.path("delta.pth" if len(data_seeds) == 1 else f"delta_seed{s}.pth")
            if os.path.exists(self._staged(s)):
                os.replace(self._staged(s), final)
            elif not os.path.exists(final):
                raise CheckpointError(f"{self._staged(s)}: the delta of seed {s} is missing from the run folder")
            if self.args.delta_folder:  # run/delta/: config.json + delta.safetensors
                delta_folder_next_to(final)
        shutil.rmtree(self.path("partial"), ignore_errors=True)

    def write_results(self, results: Dict[str, Any]) -> None:
        """Complete and write ``results.json``, close TensorBoard and log the summary (rank 0)."""
        if not self.dist.is_main:
            return
        results.update(versions=versions(), args=flag_values(self.args), output_dir=self.out_dir,
                       world_size=self.dist.world_size, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(self.path("results.json"), results)
        self.tb.close()
        for line in summary_lines(results, self.path("results.json")):
            _logger.info(line)


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
                 f"{format_duration(res['train_time_s'])} | peak GPU memory "
                 f"{'n/a' if res['peak_memory_mib'] is None else '%.0f MiB' % res['peak_memory_mib']} | "
                 f"peak RSS {res['peak_rss_mib']:.0f} MiB")
    lines.append(f"results: {results_path}")
    lines.append("=" * 72)
    return lines
