#!/usr/bin/env python3
"""Train (or evaluate) DTL / DTL+ and the baseline tuning methods on VTAB-1k, few-shot FGFS and DG.

The original recipe: AdamW (weight decay on non-bias tensors), timm cosine schedule with warm-up for
``epochs + warmup_epochs`` epochs, fp16 autocast with a gradient scaler (``--amp``), batch 32 / 256, seed 42.
What each benchmark trains on, evaluates and selects is its :class:`data.benchmark.Benchmark`:

* VTAB-1k: train on ``train800val200``, evaluate ``test`` once after the last epoch.
* Few-shot: for each data seed, a fresh model on the k-shot list; validate every ``--eval_interval`` (10)
  epochs and at the end, keep the best validation weights (strictly better replaces), test them at the end.
* Domain generalisation: for each data seed, train on the ImageNet k-shot source, evaluate the target(s)
  after the last epoch (``--target_dataset all``: all five).

The program: parse and check the flags -> read (and verify) the checkpoints named on the command line -> build
and check the data of every seed (on --resume: the same data, and a finished run ends here) -> check the model
flags on a meta-device model -> build the first model (backbone weights, fingerprint checks) -> open and lock the
run folder -> for each seed: build the model, train, select, evaluate, stage its delta -> results.json. Nothing
is created before the last check. One process, or several with ``torchrun`` (DDP). The run folder (:mod:`engine.run_folder`) holds ``log.txt``, ``config.yaml``, ``summary.csv``,
TensorBoard events, ``last.pth`` (resume), and -- only when the run succeeds -- the delta checkpoint(s) and
``results.json``. ``--resume RUN/last.pth`` continues an interrupted run; ``--eval_only --checkpoint
RUN/delta.pth`` evaluates a saved delta.

Examples::

    python train.py --data_dir /data/vtab-1k --dataset cifar_100 --load_path ViT-B_16.npz --lr 3e-4 --amp
    torchrun --nproc_per_node 4 train.py --config run.yaml
    python train.py --dataset cifar_100 --data_dir /data/vtab-1k --load_path ViT-B_16.npz \\
        --eval_only --checkpoint output/vtab/cifar_100/dtl/<time>/delta.pth
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch
from timm.utils import AverageMeter, random_seed

from data.benchmark import DataPlan, SeedPlan
from data.benchmarks import get_benchmark
from data.errors import DataError, UnknownNameError
from engine.results import parameter_counts, run_results, seed_result
from engine.run_folder import (
    CacheInfo, ResumeState, RunFolder, SeedProgress, data_fingerprint, run_is_complete,
)
from engine.setup import (
    Loaders, backbone_label, build_data, build_model, build_prefix_cache, check_model_flags, model_kwargs,
)
from engine.trainer import Trainer, resolve_precision
from models import ModelSettingsError, count_parameters, trainable_report
from models.config import format_blocks
from models.delta import DeltaCheckpoint, build_from_delta, checkpoint_dict, delta_from_model, read_delta, spec_from_record
from models.initial import InitialCheckpoint, load_initial_checkpoint, read_initial_checkpoint
from models.pretrained import check_backbone_match, check_weights_file, weights_record
from utils.args import UsageError, parse_args, resolved_method
from utils.atomic import WriteError
from utils.checkpoint import (
    CheckpointError, read_resume_checkpoint, restore_rng_state,
)
from utils.distributed import DistInfo, cleanup_distributed, init_distributed
from utils.loader import set_epoch
from utils.logger import close_file_logs, format_duration, log_to_files, setup_logging
from utils.determinism import configure_backends
from utils.metrics import PeakMemory
from utils.runlock import RunLockedError
from utils.optim import total_epochs

_logger = logging.getLogger("train")

# Errors in what the user gave (flags, data, checkpoints, model settings, a busy run folder, a missing device):
# exit status 2 and one "error:" line (also in log.txt). Failures of the environment or of training (a write that
# failed, non-finite numbers): exit status 1, the same kind of line. Anything else is a bug: its traceback goes
# to log.txt too, and the exception propagates (exit status 1 with the traceback on the console).
USER_ERRORS = (UsageError, DataError, UnknownNameError, CheckpointError, ModelSettingsError, RunLockedError)
RUN_ERRORS = (WriteError, FloatingPointError)


@dataclass
class Context:
    """What every step of a run shares."""

    args: argparse.Namespace
    dist: DistInfo
    folder: RunFolder
    loaders: Loaders
    method: str  # results.json's method: dtl, dtl+ or a baseline
    precision: str  # what training actually runs in: fp32, fp16 or bf16
    peaks: PeakMemory  # CUDA memory peaks per phase (training / evaluation / cache build)
    initial: Optional[InitialCheckpoint] = None  # --initial_checkpoint: every seed starts from its tensors


# ------------------------------------------------------------------------------------------------- training
def train_all(ctx: Context, data: DataPlan, resume: Optional[ResumeState],
              first_model: Optional[torch.nn.Module] = None) -> Dict[str, Any]:
    """Train every seed of ``data`` (continuing ``resume``), return results.json's body. ``first_model``: the
    model of the first seed to train, built (by :func:`build_first_model`) before the run folder existed."""
    args = ctx.args
    state = resume if resume is not None else ResumeState()
    start_seed, epochs = state.seed_index, total_epochs(args)
    if resume is not None and start_seed >= len(data.seeds):
        _logger.info("resuming from %s: every seed is trained; writing the results", args.resume)
    elif resume is not None:
        _logger.info("resuming from %s: seed %d/%d, %d/%d epochs done", args.resume, start_seed + 1,
                     len(data.seeds), state.epoch, epochs)
    state.precision = ctx.precision
    ctx.peaks = PeakMemory(ctx.dist.device, initial=state.memory_peaks)
    epoch_times = AverageMeter()
    for plan in data.seeds[start_seed:]:
        resuming = resume is not None and plan.index == start_seed and state.trainer is not None
        model = first_model if plan.index == start_seed else None
        train_seed(ctx, data, plan, state, resuming, plan.index == start_seed, epoch_times, model)
    return run_results(args, method=ctx.method, backbone=backbone_label(args.model, args.model_kwargs),
                       per_seed=state.completed, epochs=epochs, counts=state.counts,
                       train_time=state.train_time_s, train_images=state.train_images, cache_info=state.cache_info,
                       info=data.info, peaks=ctx.peaks, precision=ctx.precision,
                       initial_checkpoint=ctx.initial.record() if ctx.initial is not None else None)


def build_first_model(args: argparse.Namespace, data: DataPlan, start_seed: int) -> Optional[torch.nn.Module]:
    """The model of the first seed to train, built before the run folder exists (so that bad backbone weights
    leave no folder behind), exactly as :func:`train_seed` would build it."""
    if start_seed >= len(data.seeds):
        return None
    random_seed(args.seed + data.seeds[start_seed].data_seed)
    return build_model(args, data.num_classes, lean=args.lean)


def train_seed(ctx: Context, data: DataPlan, plan: SeedPlan, state: ResumeState, resuming: bool, first: bool,
               epoch_times: AverageMeter, model: Optional[torch.nn.Module] = None) -> None:
    """One seed: a fresh model (``model``: already built), every epoch (validation, final evaluation,
    last.pth), the staged delta. ``resuming``: continue ``state``'s trainer; ``first``: the first seed of this
    invocation."""
    args, dist = ctx.args, ctx.dist
    epochs, n_seeds = total_epochs(args), len(data.seeds)
    rng_seed = args.seed + plan.data_seed
    if model is None:
        random_seed(rng_seed)  # the same model initialisation on every rank
        model = build_model(args, data.num_classes, lean=args.lean)
    if ctx.initial is not None:
        n = load_initial_checkpoint(model, ctx.initial)
        _logger.info("trainable tensors from --initial_checkpoint %s (%s): %d loaded, %d frozen ignored",
                     ctx.initial.path, ctx.initial.kind, n["loaded"], n["ignored_frozen"])
    if first:
        state.counts = parameter_counts(count_parameters(model))
        _logger.info("model %s, method %s:\n%s", args.model, ctx.method, trainable_report(model))
    trainer = Trainer(args, model, data.num_classes, dist)
    random_seed(rng_seed, dist.rank)  # training randomness differs per rank
    progress, start_epoch = SeedProgress(), 0
    if resuming:
        trainer.load_state_dict(state.trainer, args.resume)
        progress, start_epoch = state.progress or SeedProgress(), state.epoch
        if len(state.rng_states) == dist.world_size:
            restore_rng_state(state.rng_states[dist.rank])
    cache = None
    if args.cache_prefix:
        with ctx.peaks.phase("cache_build"):
            cache = build_prefix_cache(args, trainer.model, plan.train, dist, ctx.loaders.prefetch,
                                       trainer.autocast_dtype, state.cache_info)
    loader = ctx.loaders.train(plan.train, rng_seed, cache)
    tests = {k: ctx.loaders.eval(v) for k, v in plan.tests.items()}
    val_loader = ctx.loaders.eval(plan.val)
    tag = f"seed {plan.data_seed} ({plan.index + 1}/{n_seeds}) " if n_seeds > 1 else ""

    for epoch in range(start_epoch, epochs):
        set_epoch(loader, epoch, rng_seed, dist.rank)
        lr = trainer.lr()
        with ctx.peaks.phase("train"):  # reset here, read before any evaluation
            stats = trainer.train_one_epoch(loader, epoch)
        state.train_time_s += stats["seconds"]
        state.train_images += stats["images"]
        epoch_times.update(stats["seconds"])
        row: Dict[str, Any] = {"seed": plan.data_seed, "epoch": epoch + 1, "lr": lr, "train_loss": stats["loss"],
                               "seconds": round(stats["seconds"], 3),
                               "images_per_s": round(stats["images"] / max(stats["seconds"], 1e-9), 2)}
        last = epoch + 1 == epochs
        note = ""
        if val_loader is not None and ((epoch + 1) % args.eval_interval == 0 or last):
            with ctx.peaks.phase("eval"):
                val = trainer.evaluate(val_loader)
            row["val_top1"] = val["top1"]
            progress.offer(val["top1"], epoch + 1, trainer.delta)
            note = f" | val {val['top1']:.2f} (best {progress.best_val:.2f} @ {progress.best_epoch})"
        if last:
            with ctx.peaks.phase("eval"):
                progress.final = final_evaluation(trainer, tests, progress)
            row.update({f"{name}_top1": res["top1"] for name, res in progress.final.items()})
            note += " | " + ", ".join(f"{k} {v['top1']:.2f}" for k, v in progress.final.items())
        remaining = (epochs - epoch - 1) + (n_seeds - plan.index - 1) * epochs
        _logger.info("%sepoch %d/%d | loss %.4f | lr %.3e | %.1f img/s | %.1fs | ETA %s%s", tag, epoch + 1, epochs,
                     stats["loss"], lr, row["images_per_s"], stats["seconds"],
                     format_duration(remaining * epoch_times.avg), note)
        prefix = f"seed{plan.data_seed}/" if n_seeds > 1 else ""
        scalars = {f"{prefix}train/loss": stats["loss"], f"{prefix}train/lr": lr,
                   f"{prefix}val/top1": row.get("val_top1"),
                   **{f"{prefix}{k}/top1": v["top1"] for k, v in (progress.final or {}).items() if last}}
        ctx.folder.log_epoch(row, scalars, epoch + 1)
        state.seed_index, state.epoch, state.trainer, state.progress = (plan.index, epoch + 1, trainer.state_dict(),
                                                                        progress)
        state.memory_peaks = ctx.peaks.state()
        ctx.folder.save_resume(state)

    if progress.final is None:  # resumed from a checkpoint written before the final evaluation
        with ctx.peaks.phase("eval"):
            progress.final = final_evaluation(trainer, tests, progress)
    primary = get_benchmark(args.benchmark).primary(args.dataset, list(progress.final))
    result = seed_result(plan.data_seed, progress.final, primary, progress.best_val, progress.best_epoch)
    state.completed.append(result)
    if dist.is_main:
        delta = progress.best_delta if progress.best_delta is not None else trainer.delta()
        spec = spec_from_record(args.model, ctx.method, trainer.model.model_config(), model_kwargs(args))
        ctx.folder.stage_delta(plan.data_seed, checkpoint_dict(delta_from_model(
            trainer.model, spec, delta, benchmark=args.benchmark, dataset=args.dataset, shot=args.shot,
            seed=plan.data_seed, top1=result["top1"], init_seed=rng_seed)))
    state.seed_index, state.epoch, state.trainer, state.progress = plan.index + 1, 0, None, None
    ctx.folder.save_resume(state)
    if cache is not None:
        cache.close()
        del loader, cache
    _logger.info("%sdone: test top-1 %.2f%s", tag, result["top1"],
                 f" (best val {result['best_val']:.2f} @ epoch {result['best_epoch']})"
                 if result["best_val"] is not None else "")


def final_evaluation(trainer: Trainer, loaders: Dict[str, Any], progress: SeedProgress) -> Dict[str, Any]:
    """Test-split evaluation after the last epoch (with selection: of the best validation weights)."""
    with trainer.weights(progress.best_delta, "best validation weights"):
        return {k: trainer.evaluate(v) for k, v in loaders.items()}


# ---------------------------------------------------------------------------------------------- eval only
def read_eval_checkpoint(args: argparse.Namespace) -> DeltaCheckpoint:
    """--eval_only: the delta checkpoint (read before any data work); its image size wins over --img_size, and
    its model (method, fusion size, DTL settings, backbone) replaces the launcher's in the recorded flags."""
    ckpt = read_delta(args.checkpoint)
    spec = ckpt.spec
    if spec is None:
        raise CheckpointError(f"{args.checkpoint}: a {ckpt.kind} without a model description; --eval_only needs a "
                              f"delta written by train.py (delta.pth) or a delta folder")
    if spec.img_size != args.img_size:
        _logger.info("--img_size %d from the checkpoint (was %d)", spec.img_size, args.img_size)
        args.img_size = spec.img_size
    if spec.backbone != args.model:
        _logger.info("--model %s from the checkpoint (was %s)", spec.backbone, args.model)
    args.model = spec.backbone
    args.method = "dtl" if ckpt.is_dtl else spec.method
    if ckpt.is_dtl:
        dtl = ckpt.dtl_config()
        args.fusion_size, args.r, args.beta = int(dtl.fusion_size or 0), dtl.r, float(dtl.beta)
        for flag, blocks in (("lora_before_blocks", dtl.csn_blocks), ("add_after_blocks", dtl.add_back_blocks)):
            if blocks is not None:
                setattr(args, flag, format_blocks(blocks))
    else:
        args.fusion_size = 0
        args.r = args.lora_before_blocks = args.add_after_blocks = None
    return ckpt


@dataclass
class EvalModel:
    """--eval_only: the checkpoint's model with its delta loaded (built before the run folder exists)."""

    model: torch.nn.Module
    kwargs: Dict[str, Any]


def build_eval_model(args: argparse.Namespace, data: DataPlan, ck: DeltaCheckpoint) -> EvalModel:
    """--eval_only: rebuild the checkpoint's model on the given backbone weights (refusing other weights than the
    delta was trained on unless --allow_backbone_mismatch) and load its delta (:func:`models.delta.build_from_delta`)."""
    if ck.spec.num_classes != data.num_classes:
        raise CheckpointError(f"{args.checkpoint}: the checkpoint's head has {ck.spec.num_classes} classes, but "
                              f"--dataset {args.dataset} has {data.num_classes}")
    random_seed(args.seed)
    model = build_from_delta(ck, load_path=args.load_path, allow_backbone_mismatch=args.allow_backbone_mismatch)
    return EvalModel(model, ck.spec.timm_kwargs())


def evaluate_checkpoint(ctx: Context, data: DataPlan, ck: DeltaCheckpoint, built: EvalModel) -> Dict[str, Any]:
    """--eval_only: evaluate the rebuilt model on the test split(s)."""
    args, model, kwargs = ctx.args, built.model, built.kwargs
    _logger.info("model %s, method %s:\n%s", ck.spec.backbone, ck.spec.method, trainable_report(model))
    trainer = Trainer(args, model, data.num_classes, ctx.dist)
    with ctx.peaks.phase("eval"):
        final = {k: trainer.evaluate(ctx.loaders.eval(v)) for k, v in data.seeds[0].tests.items()}
    for k, v in final.items():
        _logger.info("eval %s: top-1 %.2f, top-5 %.2f (%d images)", k, v["top1"], v["top5"], v["n"])
    primary = get_benchmark(args.benchmark).primary(args.dataset, list(final))
    extra = {k: v for k, v in kwargs.items() if k not in ("drop_path_rate", "img_size", "settings")}
    return run_results(args, method=ck.spec.method, backbone=backbone_label(ck.spec.backbone, extra),
                       per_seed=[seed_result(ck.info.get("seed"), final, primary)], epochs=0,
                       counts=parameter_counts(count_parameters(model)), train_time=0.0, train_images=0,
                       cache_info=CacheInfo(), info=data.info, peaks=ctx.peaks, precision=ctx.precision,
                       checkpoint=os.path.abspath(args.checkpoint))


# ---------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace, dist_info: DistInfo, argv: Sequence[str]) -> None:
    """Parse -> plan -> train (or evaluate) -> results; every check that can fail does so before long work, and
    before the run folder exists."""
    prefetch = bool(args.prefetcher) and dist_info.device.type == "cuda"
    if args.prefetcher and not prefetch:
        _logger.info("--prefetcher is for CUDA devices; loading normally on %s", dist_info.device)
    precision = resolve_precision(args, dist_info.device)  # fp16 --amp on a CPU: fp32, said once, recorded
    if args.load_path and args.load_path != "timm":
        check_weights_file(args.load_path)
    resume = ResumeState.from_checkpoint(read_resume_checkpoint(args.resume)) if args.resume else None
    initial = read_initial_checkpoint(args.initial_checkpoint) if args.initial_checkpoint else None
    eval_ckpt = read_eval_checkpoint(args) if args.eval_only else None
    data = build_data(args, normalize=not prefetch)
    args.dataset = data.dataset
    fingerprint = data_fingerprint(data) if not args.eval_only else None
    if resume is not None:
        resume.check_matches(args, dist_info.world_size, args.resume, precision)
        resume.check_data(fingerprint, args.resume)
        folder_of_run = os.path.abspath(args.output_dir or os.path.dirname(os.path.abspath(args.resume)))
        if run_is_complete(folder_of_run, resume, len(data.seeds)):
            _logger.info("the run in %s is complete (every seed trained, results.json written): nothing to do; "
                         "start a new run to train again", folder_of_run)
            return
    check_model_flags(args, data.num_classes, initial)
    method = eval_ckpt.spec.method if eval_ckpt is not None else resolved_method(args)
    folder = RunFolder(args, dist_info, precision)
    folder.precheck()
    if eval_ckpt is not None:
        built = build_eval_model(args, data, eval_ckpt)
    else:
        first_model = build_first_model(args, data, resume.seed_index if resume is not None else 0)
        if initial is not None and initial.kind == "delta" and first_model is not None:
            check_backbone_match(initial.info.get("backbone_weights"), weights_record(first_model),
                                 f"--initial_checkpoint {initial.path}", args.allow_backbone_mismatch)
    try:
        folder.data_fingerprint = fingerprint
        folder.open(get_benchmark(args.benchmark).run_name(method, args.shot, args.eval_only), argv,
                    resume.summary_rows if resume is not None else None)
        ctx = Context(args, dist_info, folder, Loaders(args, dist_info, prefetch), method, precision,
                      PeakMemory(dist_info.device), initial)
        if eval_ckpt is not None:
            folder.write_results(evaluate_checkpoint(ctx, data, eval_ckpt, built))
            return
        results = train_all(ctx, data, resume, first_model)
        folder.publish_deltas([plan.data_seed for plan in data.seeds])
        folder.write_results(results)
    finally:
        folder.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input, 1 other failure)."""
    setup_logging(int(os.environ.get("RANK", "0")))
    try:
        args = parse_args(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        dist_info = init_distributed(args.device)
        configure_backends(args.deterministic, dist_info.device)  # cudnn.benchmark, or --deterministic
        run(args, dist_info, sys.argv[1:] if argv is None else argv)
        return 0
    except USER_ERRORS as e:
        _logger.error("error: %s", e)
        return 2
    except RUN_ERRORS as e:
        _logger.error("error: %s", e)
        return 1
    except Exception as e:
        log_to_files(f"error: internal error (a bug; please report it with this traceback): {type(e).__name__}: {e}")
        raise
    finally:
        close_file_logs()
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
