#!/usr/bin/env python3
"""Train (or evaluate) DTL / DTL+ and the baseline tuning methods on VTAB-1k, few-shot FGFS and DG.

The original recipes (SPEC §2-§3): AdamW (weight decay on non-bias tensors), timm cosine schedule with warm-up
for ``epochs + warmup_epochs`` epochs, fp16 autocast with a gradient scaler (``--amp``), batch 32 / 256, seed 42.

* VTAB-1k: train on ``train800val200``, evaluate ``test`` once after the last epoch.
* Few-shot: for each data seed, a fresh model on the k-shot list; validate every ``--eval_interval`` (10)
  epochs and at the end, keep the best validation weights (strictly better replaces), test them at the end.
* Domain generalisation: for each data seed, train on the ImageNet k-shot source, evaluate the target(s)
  after the last epoch (``--target_dataset all``: all five).

One process, or several with ``torchrun`` (DDP). Every run writes one folder: ``log.txt``, ``config.yaml``,
``summary.csv``, TensorBoard events, ``last.pth`` (resume), and -- only when the run succeeds -- the delta
checkpoint(s) and ``results.json``.  ``--resume RUN/last.pth`` continues an interrupted run; ``--eval_only
--checkpoint RUN/delta.pth`` evaluates a saved delta.

Examples::

    python train.py --data_dir /data/vtab-1k --dataset cifar_100 --load_path ViT-B_16.npz --lr 3e-4 --amp
    torchrun --nproc_per_node 4 train.py --config run.yaml
    python train.py --dataset cifar_100 --data_dir /data/vtab-1k --load_path ViT-B_16.npz \\
        --eval_only --checkpoint output/vtab/cifar_100/dtl/<time>/delta.pth
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from data.datasets import DataError
from data.transforms import DTL_MEAN, DTL_STD
from models import DTLConfig, count_parameters, create_tuned_model, delta_state_dict, load_delta_state_dict
from models import trainable_report
from models.factory import backbone_arch
from models.hub import delta_folder_next_to
from utils.args import UsageError, parse_args, resolved_method
from utils.checkpoint import (
    RESUME_FORMAT, CheckpointError, atomic_torch_save, atomic_write_json, atomic_write_text, capture_rng_state,
    make_delta_checkpoint, read_delta_checkpoint, read_resume_checkpoint, restore_rng_state,
)
from utils.distributed import (
    DistInfo, all_gather_object, all_reduce_sum, barrier, broadcast_object, cleanup_distributed, init_distributed,
)
from utils.loader import CudaPrefetcher, build_cache_train_loader, build_eval_loader, build_train_loader, set_epoch
from utils.logger import SummaryTable, TensorBoardLogger, add_file_log, close_file_logs, format_duration, setup_logging
from utils.metrics import AverageMeter, TopKCounter, mean_std, peak_cuda_mib, peak_rss_mib, reset_peak_memory
from utils.metrics import versions
from utils.optim import TrainableEMA, create_losses, create_mixup, create_optimizer, create_scheduler, total_epochs

_logger = logging.getLogger("train")

# Flags that must be equal when a run is resumed (everything that changes what is trained or measured).
RESUME_MUST_MATCH = (
    "benchmark", "dataset", "shot", "seeds", "target_dataset", "model", "method", "fusion_size", "r", "beta",
    "lora_before_blocks", "add_after_blocks", "drop_path", "img_size", "model_kwargs", "lr", "weight_decay", "epochs",
    "warmup_epochs", "min_lr", "warmup_lr", "batch_size", "mixup", "cutmix", "mixup_prob", "smoothing", "ema",
    "ema_decay", "seed", "eval_interval", "lean", "cache_prefix", "cache_prefix_approx", "cache_dtype",
)


# ------------------------------------------------------------------------------------------------------ data
@dataclass
class SeedPlan:
    """What one seed trains on and evaluates: ``train`` (None for --eval_only), ``val`` (few-shot
    selection), ``tests`` (name -> dataset: ``test`` for VTAB/few-shot, one entry per DG target)."""

    index: int
    data_seed: int
    train: Any
    val: Any
    tests: Dict[str, Any]


@dataclass
class DataPlan:
    num_classes: int
    seeds: List[SeedPlan]
    info: Dict[str, Any] = field(default_factory=dict)  # source/target/shot for results.json


def _transform(args: argparse.Namespace, is_train: bool, normalize: bool):
    from data.transforms import build_transform

    return build_transform(args.benchmark, is_train, img_size=args.img_size, normalize=normalize)


def dg_targets(args: argparse.Namespace) -> List[str]:
    """The DG targets this run evaluates: ``--target_dataset`` (a name, a comma list, ``all``) or ``--dataset``."""
    from data.domain_generalization import DG_TARGETS, canonical_dg_target

    spec = args.target_dataset or args.dataset
    if spec.strip().lower() == "all":
        return list(DG_TARGETS)
    return [canonical_dg_target(t) for t in spec.split(",") if t.strip()]


def build_data(args: argparse.Namespace, normalize: bool) -> DataPlan:
    """Build (and cheaply check) every dataset of the run before any model exists.

    Missing folders / list files, malformed lines, out-of-range labels and missing image files raise
    :class:`DataError` naming the file and line; with ``--skip_bad_images`` every image is decoded once and the
    unreadable ones are dropped and counted.
    """
    kw = dict(skip_bad_images=args.skip_bad_images)
    test_tf = _transform(args, False, normalize)
    train_tf = _transform(args, True, normalize)
    need_train = not args.eval_only
    seeds: List[SeedPlan] = []
    info: Dict[str, Any] = {}
    if args.benchmark == "vtab":
        from data.vtab import build_vtab_dataset, get_vtab_task

        task = get_vtab_task(args.dataset)
        args.dataset = task.name
        num_classes = task.num_classes
        test = build_vtab_dataset(args.data_dir, task, "test", transform=test_tf, **kw)
        train = build_vtab_dataset(args.data_dir, task, "train800val200", transform=train_tf, **kw) if need_train else None
        for i, s in enumerate(args.seeds):
            seeds.append(SeedPlan(i, s, train, None, {"test": test}))
    elif args.benchmark == "few_shot":
        from data.few_shot import FGFS_DATASETS, build_fgfs_dataset, canonical_fgfs_name

        name = canonical_fgfs_name(args.dataset)
        num_classes = FGFS_DATASETS[name]
        test = build_fgfs_dataset(args.data_dir, name, "test", transform=test_tf, **kw)
        val = build_fgfs_dataset(args.data_dir, name, "val", transform=test_tf, **kw) if need_train else None
        for i, s in enumerate(args.seeds):
            train = build_fgfs_dataset(args.data_dir, name, "train", shot=args.shot, seed=s, transform=train_tf,
                                       **kw) if need_train else None
            seeds.append(SeedPlan(i, s, train, val, {"test": test}))
        info["shot"] = args.shot
    else:
        from data.domain_generalization import DG_NUM_CLASSES, DG_SOURCE, build_dg_source, build_dg_target

        num_classes = DG_NUM_CLASSES
        targets = dg_targets(args)
        tests = {t: build_dg_target(args.data_dir, t, transform=test_tf, **kw) for t in targets}
        for i, s in enumerate(args.seeds):
            train = build_dg_source(args.data_dir, s, shot=args.shot, transform=train_tf, **kw) if need_train else None
            seeds.append(SeedPlan(i, s, train, None, tests))
        info.update(source=f"{DG_SOURCE}-{args.shot}shot", target=targets[0] if len(targets) == 1 else targets,
                    shot=args.shot)
    if args.skip_bad_images:
        info["skipped_images"] = _verify_all(seeds)
    elif args.check_images:
        _check_headers(seeds)
    for plan in seeds:
        if plan.train is not None and len(plan.train) < args.batch_size:
            raise DataError(f"{plan.train.list_path}: {len(plan.train)} training images are fewer than one batch "
                            f"of {args.batch_size} (incomplete batches are dropped); lower --batch_size")
    return DataPlan(num_classes, seeds, info)


def _unique_datasets(seeds: Sequence[SeedPlan]) -> List[Any]:
    seen, out = set(), []
    for plan in seeds:
        for ds in [plan.train, plan.val, *plan.tests.values()]:
            if ds is not None and id(ds) not in seen:
                seen.add(id(ds))
                out.append(ds)
    return out


def _header_error(path: str) -> Optional[str]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - the header is parsed by open()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return f"{type(e).__name__}: {e}"
    return None


def _check_headers(seeds: Sequence[SeedPlan]) -> None:
    """Open the header of every listed image (threads; no decoding): a file that is not an image stops the run
    here, naming the file and its list line. Images truncated after the header fail when loaded, with the same
    kind of message."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    n = 0
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as ex:
        for ds in _unique_datasets(seeds):
            paths = [p for p, _ in ds.samples]
            for i, err in enumerate(ex.map(_header_error, paths, chunksize=64)):
                if err is not None:
                    raise DataError(f"{paths[i]}: not a readable image ({err}), listed at {ds.list_path}:"
                                    f"{ds.line_no(i)} (pass --skip_bad_images to drop unreadable images)")
            n += len(paths)
    _logger.info("checked the headers of %d images in %.1fs", n, time.perf_counter() - start)


def _verify_all(seeds: Sequence[SeedPlan]) -> int:
    """--skip_bad_images: decode every image once, drop (and report) the missing and unreadable ones."""
    total = 0
    for ds in _unique_datasets(seeds):
        skipped = ds.verify_images()
        total += skipped
        if skipped:
            _logger.warning("%s: skipped %d bad image(s) (--skip_bad_images); %d remain", ds.list_path, skipped,
                            len(ds))
    _logger.info("--skip_bad_images: %d image(s) skipped in all", total)
    return total


# ----------------------------------------------------------------------------------------------------- model
def dtl_config(args: argparse.Namespace, model_name: str) -> DTLConfig:
    """DTL settings from the flags; ``--r`` and the block flags left out (None) mean the backbone's defaults
    (ViT r=2, taps 0-(L-1), add-back second half; Swin r=4 and its stage rule, SPEC §1.2)."""
    try:
        arch = backbone_arch(model_name)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from None
    r = args.r if args.r is not None else (4 if arch == "swin" else 2)
    return DTLConfig(r=r, beta=args.beta, fusion_size=args.fusion_size, csn_blocks=args.lora_before_blocks,
                     add_back_blocks=args.add_after_blocks)


def backbone_label(model_name: str, extra: Optional[Dict[str, Any]]) -> str:
    """``results.json``'s ``backbone``: the model name, with ``--model_kwargs`` when given (so that tables keep
    differently sized backbones apart)."""
    if not extra:
        return model_name
    return model_name + "[" + ",".join(f"{k}={v}" for k, v in sorted(extra.items())) + "]"


def model_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """timm keyword arguments of the backbone (stored in delta checkpoints)."""
    return {**(args.model_kwargs or {}), "drop_path_rate": float(args.drop_path), "img_size": int(args.img_size)}


def build_model(
    args: argparse.Namespace,
    num_classes: int,
    method: Optional[str] = None,
    model_name: Optional[str] = None,
    dtl: Optional[DTLConfig] = None,
    kwargs: Optional[Dict[str, Any]] = None,
    lean: bool = False,
    weights: bool = True,
) -> nn.Module:
    """The tuned model (frozen backbone + trainable part) with the backbone weights of ``--load_path``
    (``weights=False``: without them, e.g. on the meta device to check settings); ``lean`` = ``--lean``."""
    method = method or args.method
    model_name = model_name or args.model
    load_path, pretrained = (args.load_path if weights else ""), False
    if weights and load_path == "timm":
        load_path, pretrained = None, True
        _logger.info("backbone: timm's published weights for %s (downloaded to timm's cache if needed)", model_name)
    elif weights and not load_path:
        _logger.warning("!" * 100)
        _logger.warning("!! --load_path is empty: the backbone is RANDOMLY INITIALISED (no pre-trained weights). "
                        "Results will be far below the paper's.")
        _logger.warning("!" * 100)
    if method == "dtl" and dtl is None:
        dtl = dtl_config(args, model_name)
    if method != "dtl":
        dtl_flags = [f"--{k}" for k in ("r", "lora_before_blocks", "add_after_blocks") if getattr(args, k) is not None]
        if dtl_flags and weights:
            _logger.info("%s are DTL settings: --method %s ignores them and uses its own configuration",
                         ", ".join(dtl_flags), method)
    try:
        model = create_tuned_model(method, model_name, num_classes, dtl=dtl if method == "dtl" else None,
                                   load_path=load_path or None, pretrained=pretrained, lean=lean,
                                   **(kwargs if kwargs is not None else model_kwargs(args)))
    except (CheckpointError, DataError):
        raise
    except (ValueError, RuntimeError, TypeError) as e:  # bad block ranges, unknown timm model or argument, ...
        raise UsageError(f"cannot build --model {model_name} --method {method}: {e}") from e
    return model


# ----------------------------------------------------------------------------------------------------- engine
class Trainer:
    """One model being trained or evaluated: optimiser, schedule, AMP, EMA, DDP wrapper.

    ``train_one_epoch`` runs :meth:`train_step` on every batch; ``evaluate`` counts correct predictions over all
    ranks. Alternative model steps (e.g. a cached frozen prefix) can replace :meth:`train_step` / the loaders.
    """

    def __init__(self, args: argparse.Namespace, model: nn.Module, num_classes: int, dist_info: DistInfo) -> None:
        self.args = args
        self.dist = dist_info
        self.device = dist_info.device
        self.model = model.to(self.device)
        self.optimizer = create_optimizer(self.model, args.lr, args.weight_decay)
        self.scheduler = create_scheduler(self.optimizer, args)
        self.mixup = create_mixup(args, num_classes)
        self.train_loss_fn, self.eval_loss_fn = create_losses(args, self.mixup is not None)
        self.amp_dtype = torch.float16 if args.amp_dtype == "float16" else torch.bfloat16
        self.amp = bool(args.amp)
        if self.amp and self.device.type != "cuda" and self.amp_dtype == torch.float16:
            _logger.warning("--amp with float16 needs CUDA: training in float32 on %s (use --amp_dtype bfloat16 "
                            "for CPU autocast)", self.device)
            self.amp = False
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.ema = TrainableEMA(self.model, args.ema_decay) if args.ema else None
        self.ddp_model: nn.Module = self.model
        if dist_info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                 find_unused_parameters=args.find_unused_parameters)

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _batches(self, loader):
        if isinstance(loader, CudaPrefetcher):
            yield from loader
            return
        for x, y in loader:
            if isinstance(x, Mapping):  # a prefix-cache batch: {block: inputs}
                x = {k: v.to(self.device, non_blocking=True) for k, v in x.items()}
            else:
                x = x.to(self.device, non_blocking=True)
            yield x, y.to(self.device, non_blocking=True)

    def train_step(self, images: Union[torch.Tensor, Mapping[int, torch.Tensor]],
                   targets: torch.Tensor) -> torch.Tensor:
        """One optimiser step on images (or a prefix-cache batch); returns the (detached) batch loss."""
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with self.autocast():
            out = self.ddp_model(images)
            loss = self.train_loss_fn(out.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update()
        return loss.detach()

    def train_one_epoch(self, loader) -> Dict[str, float]:
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n = 0
        start = time.perf_counter()
        for images, targets in self._batches(loader):
            loss = self.train_step(images, targets)
            loss_sum += loss.double() * targets.shape[0]
            n += targets.shape[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(n), dtype=torch.float64,
                                                                     device=self.device)]))
        total_n = int(totals[1].item())
        loss = totals[0].item() / max(total_n, 1)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training diverged: the mean training loss of the epoch is {loss} "
                                     f"(lower --lr, or check the data)")
        return {"loss": loss, "images": total_n, "seconds": seconds}

    @torch.no_grad()
    def evaluate(self, loader) -> Dict[str, float]:
        """Top-1/top-5 (%) and mean loss over the whole split, every image counted once across ranks."""
        self.model.eval()
        counter = TopKCounter(self.device)
        with self._ema_weights():
            for images, targets in self._batches(loader):
                with self.autocast():
                    out = self.model(images)
                out = out.float()
                counter.update(out, targets, self.eval_loss_fn(out, targets))
        return counter.reduce()

    @contextlib.contextmanager
    def _ema_weights(self):
        if self.ema is None:
            yield
            return
        self.ema.swap()
        try:
            yield
        finally:
            self.ema.swap()

    def delta(self) -> Dict[str, torch.Tensor]:
        """The trainable tensors that are evaluated and saved (the EMA's with ``--ema``)."""
        with self._ema_weights():
            return delta_state_dict(self.model)

    def load_delta(self, delta: Dict[str, torch.Tensor], source: str) -> None:
        """Load evaluated/saved weights (with ``--ema`` into the EMA, leaving the raw weights)."""
        with self._ema_weights():
            load_delta_state_dict(self.model, delta, source=source)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "model_delta": delta_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, sd: Dict[str, Any], source: str) -> None:
        load_delta_state_dict(self.model, sd["model_delta"], source=source)
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.scaler.load_state_dict(sd["scaler"])
        if self.ema is not None:
            if sd.get("ema") is None:
                raise CheckpointError(f"{source}: the checkpoint has no EMA state but --ema is on")
            self.ema.load_state_dict(sd["ema"], source)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


# --------------------------------------------------------------------------------------------------- the run
class Run:
    """A whole invocation of train.py: the run folder, the seeds, resume bookkeeping, results."""

    def __init__(self, args: argparse.Namespace, dist_info: DistInfo, argv: Sequence[str] = ()) -> None:
        self.args = args
        self.argv = list(argv)
        self.dist = dist_info
        self.device = dist_info.device
        self.method = resolved_method(args)
        self.prefetch = bool(args.prefetcher) and self.device.type == "cuda"
        if args.prefetcher and not self.prefetch:
            _logger.info("--prefetcher is for CUDA devices; loading normally on %s", self.device)
        self.resume_ckpt: Optional[Dict[str, Any]] = None
        self.delta_ckpt: Optional[Dict[str, Any]] = None
        self.out_dir = ""
        self.summary: Optional[SummaryTable] = None
        self.tb = TensorBoardLogger(None)
        # --cache_prefix: total build seconds over the seeds, and the size/storage/approximation of the cache
        self.cache_info: Dict[str, Any] = {"build_s": 0.0, "mib": None, "storage": None, "approximate": None}

    # ---------------------------------------------------------------------- setup
    def load_checkpoints(self) -> None:
        """Read --resume / --checkpoint first (cheap), so a wrong file fails before data and model work."""
        args = self.args
        if args.resume:
            self.resume_ckpt = read_resume_checkpoint(args.resume)
        if args.eval_only:
            ckpt = read_delta_checkpoint(args.checkpoint)
            saved_img = ckpt.get("model_kwargs", {}).get("img_size")
            if saved_img is not None and saved_img != args.img_size:
                _logger.info("--img_size %d from the checkpoint (was %d)", saved_img, args.img_size)
                args.img_size = int(saved_img)
            self.delta_ckpt = ckpt
            self.method = ckpt["method"]

    def check_resume(self) -> None:
        """A resumed run must use the settings of the interrupted one (checked after the data names resolve)."""
        ckpt, args = self.resume_ckpt, self.args
        if ckpt is None:
            return
        saved = ckpt.get("args", {})
        diffs = [f"--{k}: checkpoint {saved.get(k)!r} vs now {getattr(args, k)!r}"
                 for k in RESUME_MUST_MATCH if k in saved and _norm(saved.get(k)) != _norm(getattr(args, k))]
        if diffs:
            raise CheckpointError(f"{args.resume} was written by a run with other settings; resume with the "
                                  f"same flags (or start a new run): " + "; ".join(diffs))
        if saved.get("load_path") != args.load_path:
            _logger.warning("resuming with --load_path %r (the interrupted run used %r)", args.load_path,
                            saved.get("load_path"))
        if ckpt.get("world_size", 1) != self.dist.world_size:
            _logger.warning("resuming a %d-process run with %d processes: the random stream differs from an "
                            "uninterrupted run", ckpt.get("world_size", 1), self.dist.world_size)

    def preflight(self, num_classes: int) -> None:
        """--lean / --cache_prefix: check them on the model's structure (built on the meta device: no memory,
        no weights) before the run folder, the data loaders or the real model exist."""
        args = self.args
        if args.eval_only:
            used = [f for f, on in (("--lean", args.lean), ("--cache_prefix", args.cache_prefix)) if on]
            if used:
                _logger.info("%s only change training; --eval_only ignores them", " and ".join(used))
            return
        if not (args.lean or args.cache_prefix):
            return
        with torch.device("meta"):
            model = build_model(args, num_classes, lean=args.lean, weights=False)
        if args.cache_prefix:
            from data.transforms import transform_is_deterministic
            from models.prefix_cache import PrefixCache, PrefixCacheError

            try:
                reasons = PrefixCache.check_exact(model, deterministic=transform_is_deterministic(args.benchmark, True),
                                                  allow_approximate=args.cache_prefix_approx)
            except PrefixCacheError as e:
                raise UsageError(f"--cache_prefix: {e}") from None
            for r in reasons:
                _logger.warning("--cache_prefix_approx: training is approximate: %s", r)

    def make_output_dir(self) -> None:
        args = self.args
        if self.dist.is_main:
            if args.output_dir:
                out = args.output_dir
            elif args.resume:
                out = os.path.dirname(os.path.abspath(args.resume))
            else:
                sub = self.method if args.benchmark != "few_shot" or args.eval_only else f"{self.method}_shot_{args.shot}"
                base = os.path.join("output", args.benchmark, args.dataset, sub,
                                    ("eval_" if args.eval_only else "") + time.strftime("%Y%m%d-%H%M%S"))
                out, k = base, 1
                while os.path.exists(out):
                    out, k = f"{base}-{k}", k + 1
            out = os.path.abspath(out)
            error = None
            taken = [n for n in ("results.json", "last.pth", "summary.csv") if os.path.exists(os.path.join(out, n))]
            if taken and not args.resume:
                error = (f"--output_dir {out} already holds a run ({', '.join(taken)}); choose another folder, or "
                         f"continue that run with --resume {os.path.join(out, 'last.pth')}")
            else:
                os.makedirs(out, exist_ok=True)
        else:
            out, error = None, None
        out, error = broadcast_object((out, error))
        if error:
            raise UsageError(error)
        self.out_dir = out
        if self.dist.is_main:
            add_file_log(os.path.join(self.out_dir, "log.txt"))
            self.tb = TensorBoardLogger(self.out_dir if args.tensorboard else None)
            cfg_path = os.path.join(self.out_dir, "config.yaml")
            if not (args.resume and os.path.exists(cfg_path)):
                import yaml

                cfg = {k: v for k, v in vars(args).items() if k != "config"}
                atomic_write_text(cfg_path, "# resolved train.py flags (usable as --config)\n"
                                  + yaml.safe_dump(cfg, sort_keys=False))
        _logger.info("run folder: %s", self.out_dir)
        _logger.info("command: %s", " ".join([os.path.basename(sys.argv[0])] + list(self.argv)))

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    # ---------------------------------------------------------------------- training
    def train(self, data: DataPlan) -> Dict[str, Any]:
        args = self.args
        n_seeds = len(data.seeds)
        epochs_total = total_epochs(args)
        ck = self.resume_ckpt
        completed: List[Dict[str, Any]] = list(ck["completed"]) if ck else []
        start_seed = int(ck["seed_index"]) if ck else 0
        self.summary = SummaryTable(self.path("summary.csv") if self.dist.is_main else None,
                                    ck["summary_rows"] if ck else None)
        train_time = float(ck["train_time_s"]) if ck else 0.0
        train_images = int(ck["train_images"]) if ck else 0
        counts = ck.get("counts") if ck else None
        if ck and ck.get("cache_info"):
            self.cache_info = dict(ck["cache_info"])
        if ck:
            _logger.info("resuming from %s: seed %d/%d, %d/%d epochs done", args.resume, start_seed + 1, n_seeds,
                         int(ck["epoch"]), epochs_total)
        reset_peak_memory(self.device)
        epoch_times = AverageMeter()

        for plan in data.seeds[start_seed:]:
            resume_here = ck is not None and plan.index == start_seed and ck.get("trainer") is not None
            rng_seed = args.seed + plan.data_seed
            _seed_everything(rng_seed)  # same model initialisation on every rank
            model = build_model(args, data.num_classes, lean=args.lean)
            if plan.index == start_seed:
                c = count_parameters(model)
                counts = {"n_params": c.total, "n_trainable": c.trainable, "n_trainable_excl_head": c.trainable_excl_head}
                _logger.info("model %s, method %s:\n%s", args.model, self.method, trainable_report(model))
            trainer = Trainer(args, model, data.num_classes, self.dist)
            _seed_everything(rng_seed + self.dist.rank)  # training randomness differs per rank
            progress: Dict[str, Any] = {"best_val": None, "best_epoch": None, "best_delta": None, "final": None}
            start_epoch = 0
            if resume_here:
                trainer.load_state_dict(ck["trainer"], args.resume)
                progress = ck["progress"]
                start_epoch = int(ck["epoch"])
                states = ck.get("rng_states") or []
                if len(states) == self.dist.world_size:
                    restore_rng_state(states[self.dist.rank])
            cache = self._build_cache(trainer, plan) if args.cache_prefix else None
            loader = self._train_loader(plan.train, rng_seed, cache)
            eval_loaders = {k: self._eval_loader(v) for k, v in plan.tests.items()}
            val_loader = self._eval_loader(plan.val) if plan.val is not None else None
            tag = f"seed {plan.data_seed} ({plan.index + 1}/{n_seeds}) " if n_seeds > 1 else ""

            for epoch in range(start_epoch, epochs_total):
                set_epoch(loader, epoch, rng_seed, self.dist.rank)
                lr = trainer.lr()
                stats = trainer.train_one_epoch(loader)
                trainer.scheduler.step(epoch + 1)
                train_time += stats["seconds"]
                train_images += stats["images"]
                epoch_times.update(stats["seconds"])
                row: Dict[str, Any] = {"seed": plan.data_seed, "epoch": epoch + 1, "lr": lr,
                                       "train_loss": stats["loss"], "seconds": round(stats["seconds"], 3),
                                       "images_per_s": round(stats["images"] / max(stats["seconds"], 1e-9), 2)}
                last = epoch + 1 == epochs_total
                note = ""
                if val_loader is not None and ((epoch + 1) % args.eval_interval == 0 or last):
                    val = trainer.evaluate(val_loader)
                    row["val_top1"] = val["top1"]
                    if progress["best_val"] is None or val["top1"] > progress["best_val"]:
                        progress.update(best_val=val["top1"], best_epoch=epoch + 1, best_delta=trainer.delta())
                    note = f" | val {val['top1']:.2f} (best {progress['best_val']:.2f} @ {progress['best_epoch']})"
                if last:
                    progress["final"] = self._final_eval(trainer, eval_loaders, progress)
                    for name, res in progress["final"].items():
                        row[f"{name}_top1"] = res["top1"]
                    note += " | " + ", ".join(f"{k} {v['top1']:.2f}" for k, v in progress["final"].items())
                remaining = (epochs_total - epoch - 1) + (n_seeds - plan.index - 1) * epochs_total
                _logger.info("%sepoch %d/%d | loss %.4f | lr %.3e | %.1f img/s | %.1fs | ETA %s%s", tag, epoch + 1,
                             epochs_total, stats["loss"], lr, row["images_per_s"], stats["seconds"],
                             format_duration(remaining * epoch_times.avg), note)
                if self.dist.is_main:
                    self.summary.add(row)
                    prefix = f"seed{plan.data_seed}/" if n_seeds > 1 else ""
                    self.tb.scalars({f"{prefix}train/loss": stats["loss"], f"{prefix}train/lr": lr,
                                     f"{prefix}val/top1": row.get("val_top1"),
                                     **{f"{prefix}{k}/top1": v["top1"] for k, v in (progress["final"] or {}).items()
                                        if last}}, epoch + 1)
                self._save_last(trainer, plan.index, epoch + 1, progress, completed, train_time, train_images,
                                counts)

            if progress.get("final") is None:  # resumed from a checkpoint written before the final evaluation
                progress["final"] = self._final_eval(trainer, eval_loaders, progress)
            seed_result = self._seed_result(plan, progress)
            completed.append(seed_result)
            if self.dist.is_main:
                delta = progress["best_delta"] if progress["best_delta"] is not None else trainer.delta()
                self._write_delta(self.path(os.path.join("partial", f"delta_seed{plan.data_seed}.pth")), delta,
                                  trainer.model, plan, seed_result["top1"])
            self._save_last(None, plan.index + 1, 0, None, completed, train_time, train_images, counts)
            if cache is not None:
                cache.close()
                del loader, cache
            _logger.info("%sdone: test top-1 %.2f%s", tag, seed_result["top1"],
                         f" (best val {seed_result['best_val']:.2f} @ epoch {seed_result['best_epoch']})"
                         if seed_result["best_val"] is not None else "")
            del trainer, model
        return self._results(data, completed, epochs_total, train_time, train_images, counts)

    def _build_cache(self, trainer: Trainer, plan: SeedPlan):
        """--cache_prefix: the frozen prefix over this seed's training images, computed once (rebuilt on resume).

        Built inside ``fork_rng``, so the random stream of training is the one of an uncached run."""
        from data.transforms import normalize_uint8_batch, transform_is_deterministic
        from models.prefix_cache import PrefixCache, PrefixCacheError

        args = self.args
        preprocess = (lambda x: normalize_uint8_batch(x, DTL_MEAN, DTL_STD)) if self.prefetch else None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            try:
                cache = PrefixCache.build(
                    trainer.model, plan.train, batch_size=args.batch_size_test, device=self.device,
                    storage=args.cache_storage, dir=args.cache_dir, dtype=getattr(torch, args.cache_dtype),
                    deterministic=transform_is_deterministic(args.benchmark, True),
                    allow_approximate=args.cache_prefix_approx, num_workers=args.num_workers, preprocess=preprocess,
                    autocast_dtype=trainer.amp_dtype if trainer.amp else None, log=_logger.info,
                )
            except PrefixCacheError as e:
                raise UsageError(f"--cache_prefix: {e}") from None
        info = self.cache_info
        info["build_s"] = float(info.get("build_s") or 0.0) + cache.build_seconds
        info["mib"] = max(float(info.get("mib") or 0.0), cache.nbytes / 2 ** 20)
        info.update(storage=cache.storage, approximate=cache.approximate)
        _logger.info("prefix cache ready: %d images, %.1f MiB in %s, %.1fs to build (not counted in the epoch times)",
                     len(cache), cache.nbytes / 2 ** 20, cache.storage, cache.build_seconds)
        return cache

    def _train_loader(self, dataset, seed: int, cache=None):
        per_proc = self.args.batch_size // self.dist.world_size
        if cache is not None:  # same sampler as below: the same images in the same batches
            return build_cache_train_loader(cache, per_proc, self.dist, seed)
        loader = build_train_loader(dataset, per_proc, self.dist, seed, self.args.num_workers,
                                    pin_memory=self.device.type == "cuda")
        return CudaPrefetcher(loader, self.device, DTL_MEAN, DTL_STD) if self.prefetch else loader

    def _eval_loader(self, dataset):
        if dataset is None:
            return None
        loader = build_eval_loader(dataset, self.args.batch_size_test, self.dist, self.args.num_workers,
                                   pin_memory=self.device.type == "cuda")
        return CudaPrefetcher(loader, self.device, DTL_MEAN, DTL_STD) if self.prefetch else loader

    def _final_eval(self, trainer: Trainer, loaders: Dict[str, Any], progress: Dict[str, Any]) -> Dict[str, Any]:
        """Test-split evaluation after the last epoch (few-shot: of the best validation weights)."""
        if progress.get("best_delta") is not None:
            current = trainer.delta()
            trainer.load_delta(progress["best_delta"], "best validation weights")
            out = {k: trainer.evaluate(v) for k, v in loaders.items()}
            trainer.load_delta(current, "last weights")
            return out
        return {k: trainer.evaluate(v) for k, v in loaders.items()}

    def _seed_result(self, plan: SeedPlan, progress: Dict[str, Any]) -> Dict[str, Any]:
        final = progress["final"]
        primary = self._primary(final)
        res = {"seed": plan.data_seed, "top1": final[primary]["top1"], "best_val": progress["best_val"],
               "best_epoch": progress["best_epoch"], "n_test_images": {k: v["n"] for k, v in final.items()}}
        if len(final) > 1:
            res["targets"] = {k: v["top1"] for k, v in final.items()}
        return res

    def _primary(self, final: Dict[str, Any]) -> str:
        if "test" in final:
            return "test"
        from data.domain_generalization import canonical_dg_target

        try:
            name = canonical_dg_target(self.args.dataset)
        except ValueError:
            name = None
        return name if name in final else next(iter(final))

    def _save_last(self, trainer: Optional[Trainer], seed_index: int, epoch: int, progress, completed,
                   train_time: float, train_images: int, counts) -> None:
        states = all_gather_object(capture_rng_state())
        if not self.dist.is_main:
            return
        ckpt = {
            "format": RESUME_FORMAT,
            "args": {k: _norm(v) for k, v in vars(self.args).items()},
            "world_size": self.dist.world_size,
            "seed_index": seed_index,
            "epoch": epoch,
            "trainer": trainer.state_dict() if trainer is not None else None,
            "progress": progress,
            "completed": completed,
            "summary_rows": self.summary.rows,
            "train_time_s": train_time,
            "train_images": train_images,
            "counts": counts,
            "cache_info": self.cache_info,
            "rng_states": states,
        }
        atomic_torch_save(ckpt, self.path("last.pth"))

    def _write_delta(self, path: str, delta, model: nn.Module, plan: Optional[SeedPlan], top1: Optional[float],
                     kwargs: Optional[Dict[str, Any]] = None) -> None:
        ckpt = make_delta_checkpoint(
            delta, model.model_config(), self.method, self.args.model, kwargs if kwargs is not None else model_kwargs(self.args),
            benchmark=self.args.benchmark, dataset=self.args.dataset, shot=self.args.shot,
            seed=plan.data_seed if plan is not None else None, top1=top1,
        )
        atomic_torch_save(ckpt, path)

    def _results(self, data: DataPlan, completed: List[Dict[str, Any]], epochs: int, train_time: float,
                 train_images: int, counts) -> Dict[str, Any]:
        stats = mean_std([c["top1"] for c in completed])
        res: Dict[str, Any] = {
            "benchmark": self.args.benchmark,
            "dataset": self.args.dataset,
            "backbone": backbone_label(self.args.model, self.args.model_kwargs),
            "method": self.method,
            "top1": stats["mean"],
            "top1_std": stats["std"],
            "epochs": epochs,
            **counts,
            **self._resources(),
            "train_time_s": round(train_time, 3),
            "images_per_s": round(train_images / train_time, 2) if train_time > 0 else None,
            "per_seed": completed,
            "n_test_images": completed[-1]["n_test_images"] if completed else None,
            **self._memory_flags(),
            **data.info,
        }
        if any("targets" in c for c in completed):
            names = list(completed[0]["targets"])
            res["per_target"] = {t: {**_rename(mean_std([c["targets"][t] for c in completed]))} for t in names}
        return res

    def _memory_flags(self) -> Dict[str, Any]:
        """``lean``/``cache_prefix`` and, with the cache, its build time (all seeds, not in ``train_time_s``),
        size (MiB, one seed's cache), storage and whether it was approximate."""
        args, info = self.args, self.cache_info
        on = bool(args.cache_prefix) and not args.eval_only
        return {"lean": bool(args.lean) and not args.eval_only, "cache_prefix": on,
                "cache_build_s": round(float(info["build_s"]), 3) if on else None,
                "cache_mib": round(float(info["mib"]), 3) if on and info.get("mib") is not None else None,
                "cache_storage": info.get("storage") if on else None,
                "cache_approximate": info.get("approximate") if on else None}

    def _resources(self) -> Dict[str, Any]:
        peaks = all_gather_object((peak_cuda_mib(self.device), peak_rss_mib()))
        cuda = [p[0] for p in peaks if p[0] is not None]
        return {"peak_memory_mib": round(max(cuda), 1) if cuda else None,
                "peak_rss_mib": round(max(p[1] for p in peaks), 1)}

    def finish(self, results: Dict[str, Any], data: DataPlan) -> None:
        """Move the staged deltas into place and write results.json (rank 0; only after success)."""
        barrier()
        if not self.dist.is_main:
            return
        single = len(data.seeds) == 1
        for plan in data.seeds:
            staged = self.path(os.path.join("partial", f"delta_seed{plan.data_seed}.pth"))
            final = self.path("delta.pth" if single else f"delta_seed{plan.data_seed}.pth")
            if os.path.exists(staged):
                os.replace(staged, final)
            elif not os.path.exists(final):
                raise CheckpointError(f"{staged}: the delta of seed {plan.data_seed} is missing from the run folder")
            if self.args.delta_folder:  # run/delta/ (config.json + delta.safetensors), models.hub
                delta_folder_next_to(final)
        shutil.rmtree(self.path("partial"), ignore_errors=True)
        results.update(versions=versions(), args={k: _norm(v) for k, v in vars(self.args).items()},
                       output_dir=self.out_dir, world_size=self.dist.world_size,
                       finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(self.path("results.json"), results)
        self.tb.close()
        self._log_summary(results)

    def _log_summary(self, res: Dict[str, Any]) -> None:
        lines = [
            "=" * 72,
            f"{res['benchmark']} / {res['dataset']} / {res['method']} on {res['backbone']}"
            + (f" / {res['shot']}-shot" if res.get("shot") and res["benchmark"] == "few_shot" else ""),
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
        lines.append(f"results: {self.path('results.json')}")
        lines.append("=" * 72)
        for line in lines:
            _logger.info(line)

    # ---------------------------------------------------------------------- evaluation only
    def evaluate_only(self, data: DataPlan) -> Dict[str, Any]:
        args, ck = self.args, self.delta_ckpt
        cfg = ck["model_config"]
        n_ckpt = cfg.get("num_classes")
        if n_ckpt != data.num_classes:
            raise CheckpointError(f"{args.checkpoint}: the checkpoint's head has {n_ckpt} classes, but --dataset "
                                  f"{args.dataset} has {data.num_classes}")
        method = "dtl" if ck["method"] in ("dtl", "dtl+") else ck["method"]
        if ck["backbone"] != args.model:
            _logger.info("--model %s from the checkpoint (was %s)", ck["backbone"], args.model)
        dtl = DTLConfig.from_dict(cfg["dtl"]) if method == "dtl" and "dtl" in cfg else None
        kwargs = dict(ck.get("model_kwargs", {}))
        if method != "dtl":  # a baseline's own settings (e.g. LoRA's rank) are part of its configuration
            settings = {k: v for k, v in cfg.items() if k not in ("arch", "method", "num_classes")}
            if settings:
                kwargs["settings"] = settings
        _seed_everything(args.seed)
        model = build_model(args, data.num_classes, method=method, model_name=ck["backbone"], dtl=dtl,
                            kwargs=kwargs)
        if _norm(model.model_config()) != _norm(cfg):
            raise CheckpointError(f"{args.checkpoint}: stored model configuration {cfg} does not match the rebuilt "
                                  f"model {model.model_config()}")
        try:
            load_delta_state_dict(model, ck["delta"], source=args.checkpoint)
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        c = count_parameters(model)
        _logger.info("model %s, method %s:\n%s", ck["backbone"], ck["method"], trainable_report(model))
        self.method = ck["method"]
        self.args.model = ck["backbone"]
        trainer = Trainer(args, model, data.num_classes, self.dist)
        plan = data.seeds[0]
        final = {k: trainer.evaluate(self._eval_loader(v)) for k, v in plan.tests.items()}
        primary = self._primary(final)
        seed_res = {"seed": ck.get("seed"), "top1": final[primary]["top1"], "best_val": None, "best_epoch": None}
        if len(final) > 1:
            seed_res["targets"] = {k: v["top1"] for k, v in final.items()}
        res: Dict[str, Any] = {
            "benchmark": args.benchmark, "dataset": args.dataset, "method": ck["method"],
            "backbone": backbone_label(ck["backbone"], {k: v for k, v in kwargs.items()
                                                        if k not in ("drop_path_rate", "img_size", "settings")}),
            "top1": final[primary]["top1"], "top1_std": None, "epochs": 0,
            "n_params": c.total, "n_trainable": c.trainable, "n_trainable_excl_head": c.trainable_excl_head,
            **self._resources(), "train_time_s": 0.0, "images_per_s": None, "per_seed": [seed_res],
            **self._memory_flags(),
            "n_test_images": {k: v["n"] for k, v in final.items()}, "checkpoint": os.path.abspath(args.checkpoint),
            **data.info,
        }
        if len(final) > 1:
            res["per_target"] = {k: {"top1": v["top1"], "top1_std": None} for k, v in final.items()}
        for k, v in final.items():
            _logger.info("eval %s: top-1 %.2f, top-5 %.2f (%d images)", k, v["top1"], v["top5"], v["n"])
        return res

    def finish_eval(self, results: Dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        results.update(versions=versions(), args={k: _norm(v) for k, v in vars(self.args).items()},
                       output_dir=self.out_dir, world_size=self.dist.world_size,
                       finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(self.path("results.json"), results)
        self.tb.close()
        self._log_summary(results)


def _rename(ms: Dict[str, Optional[float]]) -> Dict[str, Optional[float]]:
    return {"top1": ms["mean"], "top1_std": ms["std"]}


def _norm(v: Any) -> Any:
    """A JSON-friendly, comparable form of a flag value."""
    if isinstance(v, tuple):
        return [_norm(x) for x in v]
    if isinstance(v, list):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input, 1 other failure)."""
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dist_info: Optional[DistInfo] = None
    try:
        args = parse_args(argv, world_size=world_size)
        dist_info = init_distributed(args.device)
        if dist_info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        run = Run(args, dist_info, sys.argv[1:] if argv is None else argv)
        run.load_checkpoints()
        try:
            data = build_data(args, normalize=not run.prefetch)
        except DataError:
            raise
        except ValueError as e:  # unknown task / dataset / target names
            raise UsageError(str(e)) from e
        run.check_resume()
        run.preflight(data.num_classes)
        run.make_output_dir()
        if args.eval_only:
            results = run.evaluate_only(data)
            run.finish_eval(results)
        else:
            results = run.train(data)
            run.finish(results, data)
        return 0
    except (UsageError, DataError, CheckpointError) as e:
        _logger.error("error: %s", e)
        return 2
    except FloatingPointError as e:
        _logger.error("error: %s", e)
        return 1
    finally:
        close_file_logs()
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
