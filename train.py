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

The program: parse and check the flags -> build the run's frozen specs once (:mod:`cli.specs`: model, data, optim,
run; later steps derive new ones, nothing mutates them) -> read (and verify) the checkpoints named on the command line -> build
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

import logging
import os
import sys
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Sequence

import torch
from timm.utils import AverageMeter, random_seed

from cli.specs import build_experiment, on_device, parse_args, with_data, with_model
from data.benchmark import DataPlan, SeedPlan
from data.benchmarks import get_benchmark
from data.errors import DataError, UnknownNameError
from engine.results import parameter_counts, run_results, seed_result
from engine.run_folder import (
    CacheInfo, ResumeState, RunFolder, SeedProgress, check_finished_seeds, data_fingerprint, run_is_complete,
    split_paths,
)
from engine.setup import (
    Loaders, backbone_label, build_data, build_model, build_prefix_cache, check_model_flags,
)
from engine.spec import Experiment, RunSpec
from engine.trainer import Trainer
from models import ModelSettingsError, count_parameters, trainable_report
from models.delta import (
    DeltaCheckpoint, build_from_delta, check_backbone_architecture, check_delta_folder_supported, checkpoint_dict,
    class_names_difference, delta_from_model, read_delta,
)
from models.initial import InitialCheckpoint, load_initial_checkpoint, read_initial_checkpoint
from models.pretrained import check_backbone_match, check_weights_file, weights_record
from utils.atomic import WriteError
from utils.checkpoint import (
    CheckpointError, read_resume_checkpoint, restore_rng_state,
)
from utils.distributed import DistInfo, cleanup_distributed, init_distributed
from utils.errors import UsageError
from utils.loader import set_epoch
from utils.logger import close_file_logs, format_duration, log_to_files, setup_logging
from utils.determinism import configure_backends
from utils.metrics import PeakMemory
from utils.runlock import RunLockedError
from utils import signals
from utils.signals import Terminated  # noqa: F401 - SIGTERM's KeyboardInterrupt (was defined here)

_logger = logging.getLogger("train")

# Errors in what the user gave (flags, data, checkpoints, model settings, a busy run folder, a missing device):
# exit status 2 and one "error:" line (also in log.txt). Failures of the environment or of training (a write that
# failed, non-finite numbers): exit status 1, the same kind of line. Anything else is a bug: its traceback goes
# to log.txt too, and the exception propagates (exit status 1 with the traceback on the console).
USER_ERRORS = (UsageError, DataError, UnknownNameError, CheckpointError, ModelSettingsError, RunLockedError)
RUN_ERRORS = (WriteError, FloatingPointError)


class Interrupted(BaseException):
    """A run stopped by SIGINT or SIGTERM; the message says where it stopped and how to resume it."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status  # 130 (SIGINT) or 143 (SIGTERM), as a shell reports a process the signal ended


def interruption(folder: RunFolder, epochs: int, e: BaseException, seeds: Sequence[int] = ()) -> Interrupted:
    """The :class:`Interrupted` of a run whose folder is ``folder`` (``epochs``: epochs per seed; ``seeds``: the
    run's data seeds, named in the line when there are several)."""
    status = signals.status(e)
    last = folder.path("last.pth") if folder.out_dir else ""
    if not last or not os.path.isfile(last):
        where = f" (no last.pth in {folder.out_dir})" if folder.out_dir else ""
        return Interrupted(f"interrupted: the run stopped before its first checkpoint{where}; nothing can be "
                           f"resumed", status)
    where = f"epoch {min(folder.epoch + 1, epochs)}"
    if len(seeds) > 1:
        i = min(folder.seed_index, len(seeds) - 1)
        where += f" of seed {seeds[i]} ({i + 1}/{len(seeds)})"
    return Interrupted(f"interrupted at {where}; resume with --resume {last}", status)


def check_resume_folder(run_spec: RunSpec) -> None:
    """A last.pth belongs to its run folder: ``--resume X/last.pth`` continues in X, and an ``--output_dir``
    naming another folder is refused (it would overwrite the run there)."""
    if not (run_spec.resume and run_spec.output_dir):
        return
    own = os.path.realpath(os.path.dirname(os.path.abspath(run_spec.resume)))
    named = os.path.realpath(run_spec.output_dir)
    if own != named:
        raise UsageError(f"--resume {run_spec.resume} continues the run in {own}, but --output_dir names {named}; "
                         f"drop --output_dir to resume that run in its own folder")


@dataclass
class Context:
    """What every step of a run shares."""

    exp: Experiment  # the run's specs (with the loaded backbone's fingerprint)
    dist: DistInfo
    folder: RunFolder
    loaders: Loaders
    peaks: PeakMemory  # CUDA memory peaks per phase (training / evaluation / cache build)
    initial: Optional[InitialCheckpoint] = None  # --initial_checkpoint: every seed starts from its tensors


def with_weights(exp: Experiment, model: torch.nn.Module) -> Experiment:
    """``exp`` with the fingerprint of the backbone tensors ``model`` was built with (random: none)."""
    record = weights_record(model)
    if record is None or exp.model.weights.kind == "random":
        return exp
    return exp.replace(model=exp.model.replace(weights=replace(exp.model.weights,
                                                               fingerprint=record.get("fingerprint"))))


# ------------------------------------------------------------------------------------------------- training
def train_all(ctx: Context, data: DataPlan, resume: Optional[ResumeState],
              first_model: Optional[torch.nn.Module] = None) -> Dict[str, Any]:
    """Train every seed of ``data`` (continuing ``resume``), return results.json's body. ``first_model``: the
    model of the first seed to train, built (by :func:`build_first_model`) before the run folder existed."""
    exp = ctx.exp
    state = resume if resume is not None else ResumeState()
    start_seed, epochs = state.seed_index, exp.optim.total_epochs
    if resume is not None and start_seed >= len(data.seeds):
        _logger.info("resuming from %s: every seed is trained; writing the results", exp.run.resume)
    elif resume is not None:
        _logger.info("resuming from %s: seed %d/%d, %d/%d epochs done", exp.run.resume, start_seed + 1,
                     len(data.seeds), state.epoch, epochs)
    state.precision = exp.run.precision
    ctx.peaks = PeakMemory(ctx.dist.device, initial=state.memory_peaks)
    epoch_times = AverageMeter()
    for plan in data.seeds[start_seed:]:
        resuming = resume is not None and plan.index == start_seed and state.trainer is not None
        model = first_model if plan.index == start_seed else None
        train_seed(ctx, data, plan, state, resuming, plan.index == start_seed, epoch_times, model)
    return run_results(exp, method=exp.model.method, backbone=backbone_label(exp.model),
                       per_seed=state.completed, epochs=epochs, counts=state.counts,
                       train_time=state.train_time_s, train_images=state.train_images, cache_info=state.cache_info,
                       info=data.info, peaks=ctx.peaks, precision=exp.run.precision,
                       initial_checkpoint=ctx.initial.record() if ctx.initial is not None else None)


def build_first_model(exp: Experiment, data: DataPlan, start_seed: int) -> Optional[torch.nn.Module]:
    """The model of the first seed to train, built before the run folder exists (so that bad backbone weights
    leave no folder behind), exactly as :func:`train_seed` would build it."""
    if start_seed >= len(data.seeds):
        return None
    random_seed(exp.optim.seed + data.seeds[start_seed].data_seed)
    return build_model(exp.model, lean=exp.run.lean)


def train_seed(ctx: Context, data: DataPlan, plan: SeedPlan, state: ResumeState, resuming: bool, first: bool,
               epoch_times: AverageMeter, model: Optional[torch.nn.Module] = None) -> None:
    """One seed: a fresh model (``model``: already built), every epoch (validation, final evaluation,
    last.pth), the staged delta. ``resuming``: continue ``state``'s trainer; ``first``: the first seed of this
    invocation."""
    exp, dist = ctx.exp, ctx.dist
    optim, run = exp.optim, exp.run
    epochs, n_seeds = optim.total_epochs, len(data.seeds)
    rng_seed = optim.seed + plan.data_seed
    if model is None:
        random_seed(rng_seed)  # the same model initialisation on every rank
        model = build_model(exp.model, lean=run.lean)
    if ctx.initial is not None:
        n = load_initial_checkpoint(model, ctx.initial)
        _logger.info("trainable tensors from --initial_checkpoint %s (%s): %d loaded, %d frozen ignored",
                     ctx.initial.path, ctx.initial.kind, n["loaded"], n["ignored_frozen"])
    if first:
        state.counts = parameter_counts(count_parameters(model))
        _logger.info("model %s, method %s:\n%s", exp.model.backbone, exp.model.method, trainable_report(model))
    trainer = Trainer(model, optim, run.precision, dist, exp.model.num_classes,
                      find_unused_parameters=run.find_unused_parameters)
    random_seed(rng_seed, dist.rank)  # training randomness differs per rank
    progress, start_epoch = SeedProgress(), 0
    if resuming:
        trainer.load_state_dict(state.trainer, run.resume)
        progress, start_epoch = state.progress or SeedProgress(), state.epoch
        if len(state.rng_states) == dist.world_size:
            restore_rng_state(state.rng_states[dist.rank])
    cache = None
    if run.cache_prefix:
        with ctx.peaks.phase("cache_build"):
            cache = build_prefix_cache(exp, trainer.model, plan.train, dist, ctx.loaders.prefetch,
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
        if val_loader is not None and ((epoch + 1) % optim.eval_interval == 0 or last):
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
    primary = get_benchmark(exp.data.benchmark).primary(exp.data.dataset, list(progress.final))
    result = seed_result(plan.data_seed, progress.final, primary, progress.best_val, progress.best_epoch)
    state.completed.append(result)
    if dist.is_main:
        delta = progress.best_delta if progress.best_delta is not None else trainer.delta()
        ctx.folder.stage_delta(plan.data_seed, checkpoint_dict(delta_from_model(
            trainer.model, exp.model, delta, benchmark=exp.data.benchmark, dataset=exp.data.dataset,
            shot=exp.data.shot, seed=plan.data_seed, top1=result["top1"], init_seed=rng_seed)))
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
def build_eval_model(exp: Experiment, ck: DeltaCheckpoint) -> torch.nn.Module:
    """--eval_only: the model of the delta ``ck`` rebuilt from its spec on the given backbone weights (refusing
    other weights than the delta was trained on unless --allow_backbone_mismatch), its tensors loaded
    (:func:`models.delta.build_from_delta`)."""
    random_seed(exp.optim.seed)
    return build_from_delta(ck, load_path=exp.model.weights.load_path,
                            allow_backbone_mismatch=exp.run.allow_backbone_mismatch)


def evaluate_checkpoint(ctx: Context, data: DataPlan, model: torch.nn.Module, seed: Optional[int]) -> Dict[str, Any]:
    """--eval_only: evaluate the rebuilt model (trained on data seed ``seed``) on the test split(s)."""
    exp = ctx.exp
    _logger.info("model %s, method %s:\n%s", exp.model.backbone, exp.model.method, trainable_report(model))
    trainer = Trainer(model, exp.optim, exp.run.precision, ctx.dist, exp.model.num_classes)
    with ctx.peaks.phase("eval"):
        final = {k: trainer.evaluate(ctx.loaders.eval(v)) for k, v in data.seeds[0].tests.items()}
    for k, v in final.items():
        _logger.info("eval %s: top-1 %.2f, top-5 %.2f (%d images)", k, v["top1"], v["top5"], v["n"])
    primary = get_benchmark(exp.data.benchmark).primary(exp.data.dataset, list(final))
    return run_results(exp, method=exp.model.method, backbone=backbone_label(exp.model),
                       per_seed=[seed_result(seed, final, primary)], epochs=0,
                       counts=parameter_counts(count_parameters(model)), train_time=0.0, train_images=0,
                       cache_info=CacheInfo(), info=data.info, peaks=ctx.peaks, precision=exp.run.precision,
                       checkpoint=os.path.abspath(exp.run.checkpoint))


def check_class_names(run_spec: RunSpec, eval_ckpt: Optional[DeltaCheckpoint], initial: Optional[InitialCheckpoint],
                      data_names: Optional[Sequence[str]]) -> None:
    """The classes a delta's head was trained on against the data's (both named, in label order): --eval_only
    refuses other names or another order (its labels would be scored against the wrong classes);
    --initial_checkpoint from other classes is a transfer, logged."""
    if eval_ckpt is not None:
        diff = class_names_difference(eval_ckpt.class_names, data_names)
        if diff:
            raise CheckpointError(f"--eval_only --checkpoint {run_spec.checkpoint}: its head was trained on "
                                  f"{diff}; evaluating it on this data would score its predictions against the "
                                  f"wrong classes")
    if initial is not None and len(initial.class_names or ()) == len(data_names or ()):  # else: the head's size
        diff = class_names_difference(initial.class_names, data_names)                  # is refused later
        if diff:
            _logger.warning("--initial_checkpoint %s: its head was trained on %s; it only starts the model here "
                            "(its head is trained on this data's classes)", initial.path, diff)


# ---------------------------------------------------------------------------------------------------- main
def run(exp: Experiment, dist_info: DistInfo, argv: Sequence[str]) -> None:
    """Specs -> plan -> build -> train (or evaluate) -> results; every check that can fail does so before long
    work, and before the run folder exists."""
    run_spec = exp.run
    prefetch = run_spec.prefetcher and dist_info.device.type == "cuda"
    if run_spec.prefetcher and not prefetch:
        _logger.info("--prefetcher is for CUDA devices; loading normally on %s", dist_info.device)
    exp = on_device(exp, dist_info.device)  # fp16 --amp on a CPU: fp32, said once, recorded
    if exp.model.weights.kind == "file":
        check_weights_file(exp.model.weights.source)
    resume = ResumeState.from_checkpoint(read_resume_checkpoint(run_spec.resume)) if run_spec.resume else None
    check_resume_folder(run_spec)
    initial = read_initial_checkpoint(run_spec.initial_checkpoint) if run_spec.initial_checkpoint else None
    if initial is not None and not run_spec.eval_only:  # another architecture's delta (before any data work)
        check_backbone_architecture(initial.spec, exp.model, f"--initial_checkpoint {initial.path}",
                                    run_spec.allow_backbone_mismatch)
    eval_ckpt = read_delta(run_spec.checkpoint) if run_spec.eval_only else None
    if eval_ckpt is not None:  # the checkpoint's model replaces the flags' (read before any data work)
        if eval_ckpt.spec is None:
            raise CheckpointError(f"{run_spec.checkpoint}: a {eval_ckpt.kind} without a model description; "
                                  f"--eval_only needs a delta written by train.py (delta.pth) or a delta folder")
        exp = with_model(exp, eval_ckpt.spec)
    data = build_data(exp.data, exp.model, need_train=not run_spec.eval_only, normalize=not prefetch,
                      batch_size=exp.optim.batch_size)
    if run_spec.eval_only and exp.model.num_classes != data.num_classes:
        raise CheckpointError(f"{run_spec.checkpoint}: the checkpoint's head has {exp.model.num_classes} classes, "
                              f"but --dataset {exp.data.dataset} has {data.num_classes}")
    check_class_names(run_spec, eval_ckpt, initial, data.class_names)
    exp = with_data(exp, data.dataset, data.num_classes, data.class_names)
    fingerprint = data_fingerprint(data) if not run_spec.eval_only else None
    if resume is not None:
        resume.check_matches(exp, run_spec.resume)
        resume.check_data(fingerprint, run_spec.resume, split_paths(data))
        folder_of_run = os.path.dirname(os.path.abspath(run_spec.resume))  # its own folder (check_resume_folder)
        check_finished_seeds(folder_of_run, [p.data_seed for p in data.seeds[:resume.seed_index]], len(data.seeds),
                             run_spec.resume)
        if run_is_complete(folder_of_run, resume, len(data.seeds)):
            _logger.info("the run in %s is complete (every seed trained, results.json written): nothing to do; "
                         "start a new run to train again", folder_of_run)
            return
    check_model_flags(exp, initial)
    if run_spec.delta_folder and not run_spec.eval_only:
        try:
            check_delta_folder_supported(exp.model)  # before training, not after it
        except ModelSettingsError as e:
            raise UsageError(f"--delta_folder: {e}") from None
    folder = RunFolder(exp, dist_info)
    folder.precheck()
    if eval_ckpt is not None:
        first_model = build_eval_model(exp, eval_ckpt)
    else:
        first_model = build_first_model(exp, data, resume.seed_index if resume is not None else 0)
        if initial is not None and initial.kind == "delta" and first_model is not None:
            check_backbone_match(initial.info.get("backbone_weights"), weights_record(first_model),
                                 f"--initial_checkpoint {initial.path}", run_spec.allow_backbone_mismatch)
    if first_model is not None:
        exp = with_weights(exp, first_model)
        if resume is not None:
            resume.check_weights(exp, run_spec.resume)
    folder.epoch = resume.epoch if resume is not None else 0
    folder.seed_index = resume.seed_index if resume is not None else 0
    seeds = [plan.data_seed for plan in data.seeds]
    try:
        folder.data_fingerprint = fingerprint
        folder.open(get_benchmark(exp.data.benchmark).run_name(exp.model.method, exp.data.shot, run_spec.eval_only),
                    argv, exp, resume.summary_rows if resume is not None else None)
        ctx = Context(exp, dist_info, folder, Loaders(exp.optim, exp.run, exp.model, dist_info, prefetch),
                      PeakMemory(dist_info.device), initial)
        if eval_ckpt is not None:
            folder.write_results(evaluate_checkpoint(ctx, data, first_model, eval_ckpt.info.get("seed")))
            return
        results = train_all(ctx, data, resume, first_model)
        folder.publish_deltas([plan.data_seed for plan in data.seeds])
        folder.write_results(results)
    except KeyboardInterrupt as e:
        raise interruption(folder, exp.optim.total_epochs, e, seeds) from None
    except Exception as e:
        if signals.pending() is None:
            raise
        # a failure caused by the signal (e.g. a DataLoader worker that died of it): the interruption it is
        raise interruption(folder, exp.optim.total_epochs, e, seeds) from None
    finally:
        folder.close()


def _interrupted_early(e: BaseException, rank: int) -> int:
    """The exit status (130/143) of a run interrupted before its run folder existed; rank 0 says so."""
    if rank == 0:
        _logger.error("interrupted before training started: nothing was written")
    return signals.status(e)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input, 1 other failure, 130/143 SIGINT/SIGTERM)."""
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    signals.install()  # SIGINT and SIGTERM: recorded, raised, and raised again at every batch
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        exp = build_experiment(parse_args(argv, world_size=world_size), world_size)
        dist_info = init_distributed(exp.run.device)
        configure_backends(exp.run.deterministic, dist_info.device)  # cudnn.benchmark, or --deterministic
        run(exp, dist_info, sys.argv[1:] if argv is None else argv)
        return 0
    except USER_ERRORS as e:
        _logger.error("error: %s", e)
        return 2
    except RUN_ERRORS as e:
        _logger.error("error: %s", e)
        return 1
    except Interrupted as e:
        if rank == 0:
            _logger.error("%s", e)
        return e.status
    except KeyboardInterrupt as e:  # before the run folder existed
        return _interrupted_early(e, rank)
    except Exception as e:
        if signals.pending() is not None:  # a failure the signal caused, before the run folder existed
            return _interrupted_early(e, rank)
        log_to_files(f"error: internal error (a bug; please report it with this traceback): {type(e).__name__}: {e}")
        raise
    finally:
        close_file_logs()
        cleanup_distributed()
        signals.uninstall()


if __name__ == "__main__":
    sys.exit(main())
