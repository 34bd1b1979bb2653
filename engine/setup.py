"""Everything a run builds before and around training: the data of every seed (checked before any model
exists), the tuned model, the ``--initial_checkpoint``/``--lean``/``--cache_prefix`` pre-checks, the
frozen-prefix cache and the loaders."""
from __future__ import annotations

import argparse
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from PIL import Image

from data.benchmark import DataPlan, DataRequest, SeedPlan
from data.benchmarks import get_benchmark
from data.errors import DataError
from data.transforms import DTL_MEAN, DTL_STD, Uint8Normalizer, build_transform
from models import DTLConfig, ModelSettingsError, create_tuned_model
from models.backbones import backbone_arch, default_rank
from models.initial import InitialCheckpoint, check_initial_checkpoint
from engine.prefix_cache import PrefixCache, PrefixCacheError
from engine.run_folder import CacheInfo
from utils.args import UsageError
from utils.distributed import DistInfo
from utils.loader import CudaPrefetcher, build_cache_train_loader, build_eval_loader, build_train_loader

__all__ = ["build_data", "dtl_config", "model_kwargs", "backbone_label", "build_model", "check_model_flags",
           "build_prefix_cache", "Loaders"]

_logger = logging.getLogger("train")


# ------------------------------------------------------------------------------------------------------ data
def build_data(args: argparse.Namespace, normalize: bool) -> DataPlan:
    """Build (and cheaply check) every dataset of the run before any model exists.

    Missing folders / list files, malformed lines, out-of-range labels and missing image files raise
    :class:`DataError` naming the file and line; with ``--skip_bad_images`` every image is decoded once and the
    unreadable ones are dropped and counted. Unknown dataset/target names raise
    :class:`~data.errors.UnknownNameError`.
    """
    bench = get_benchmark(args.benchmark)
    request = DataRequest(
        data_dir=args.data_dir, dataset=args.dataset, seeds=args.seeds, shot=args.shot, target=args.target_dataset,
        train_transform=build_transform(bench.name, True, img_size=args.img_size, normalize=normalize),
        test_transform=build_transform(bench.name, False, img_size=args.img_size, normalize=normalize),
        need_train=not args.eval_only, dataset_kwargs={"skip_bad_images": args.skip_bad_images})
    plan = bench.build(request)  # unknown names: data.errors.UnknownNameError, a user error
    if args.skip_bad_images:
        plan.info["skipped_images"] = _verify_all(plan.seeds)
    elif args.check_images:
        _check_headers(plan.seeds)
    for seed in plan.seeds:
        if seed.train is not None and len(seed.train) < args.batch_size:
            raise DataError(f"{seed.train.list_path}: {len(seed.train)} training images are fewer than one batch "
                            f"of {args.batch_size} (incomplete batches are dropped); lower --batch_size")
    return plan


def _unique_datasets(seeds: Sequence[SeedPlan]) -> List[Any]:
    seen, out = set(), []
    for plan in seeds:
        for ds in [plan.train, plan.val, *plan.tests.values()]:
            if ds is not None and id(ds) not in seen:
                seen.add(id(ds))
                out.append(ds)
    return out


def _header_error(path: str) -> Optional[str]:
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
    """DTL settings from the flags (``--lora_before_blocks`` -> ``csn_blocks``, ``--add_after_blocks`` ->
    ``add_back_blocks``); ``--r`` and the block flags left out (None) mean the backbone's defaults."""
    try:
        arch = backbone_arch(model_name)
    except ModelSettingsError as e:
        raise UsageError(f"--model: {e}") from None
    r = args.r if args.r is not None else default_rank(arch)
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
        return create_tuned_model(method, model_name, num_classes, dtl=dtl if method == "dtl" else None,
                                  load_path=load_path or None, pretrained=pretrained, lean=lean,
                                  **(kwargs if kwargs is not None else model_kwargs(args)))
    except ModelSettingsError as e:  # bad block ranges, an unknown backbone or timm argument, a baseline setting
        raise UsageError(f"cannot build --model {model_name} --method {method}: {e}") from e


def check_model_flags(args: argparse.Namespace, num_classes: int,
                      initial: Optional[InitialCheckpoint] = None) -> None:
    """DTL's block selection, --initial_checkpoint, --lean, --cache_prefix: check them on the model's structure
    (built on the meta device: no memory, no weights) before the run folder, the data loaders or the real model
    exist. A block selection in which no tap (``--lora_before_blocks``) reaches an add-back block
    (``--add_after_blocks``; Swin: of the same stage) would train the head alone, a linear probe recorded as DTL."""
    if args.eval_only:
        used = [f for f, on in (("--lean", args.lean), ("--cache_prefix", args.cache_prefix)) if on]
        if used:
            _logger.info("%s only change training; --eval_only ignores them", " and ".join(used))
        return
    if initial is not None:
        check_initial_checkpoint(initial, lambda: build_model(args, num_classes, weights=False))
    if args.method != "dtl" and not (args.lean or args.cache_prefix):
        return
    with torch.device("meta"):
        model = build_model(args, num_classes, lean=args.lean, weights=False)
    if args.method == "dtl" and not any(n.endswith("lora_A") and ".taps." in f".{n}"
                                        for n, _ in model.named_parameters()):
        cfg = model.model_config().get("dtl", {})
        raise UsageError(
            f"--lora_before_blocks {args.lora_before_blocks or cfg.get('csn_blocks')} and --add_after_blocks "
            f"{args.add_after_blocks or cfg.get('add_back_blocks')}: no tapped block comes at or before an add-back "
            f"block (of its stage, for Swin), so the side network would add nothing and only the head would train; "
            f"tap earlier blocks or add back after later ones")
    if args.cache_prefix:
        deterministic = get_benchmark(args.benchmark).train_transform_is_deterministic()
        try:
            reasons = PrefixCache.check_exact(model, deterministic=deterministic,
                                              allow_approximate=args.cache_prefix_approx)
        except PrefixCacheError as e:
            raise UsageError(f"--cache_prefix: {e}") from None
        for r in reasons:
            _logger.warning("--cache_prefix_approx: training is approximate: %s", r)


# --------------------------------------------------------------------------------------------- prefix cache
def build_prefix_cache(args: argparse.Namespace, model: nn.Module, dataset, dist_info: DistInfo, prefetch: bool,
                       autocast_dtype: Optional[torch.dtype], info: CacheInfo) -> PrefixCache:
    """--cache_prefix: the frozen prefix over a seed's training images, computed once (rebuilt on resume) and
    added to ``info`` (the resume state's ``cache_info``). Every process builds its own cache; the RAM/disk
    budgets of ``--cache_storage auto/host/mmap`` are divided by the processes on this node.

    Built inside ``fork_rng``, so the random stream of training is the one of an uncached run."""
    device = dist_info.device
    preprocess = Uint8Normalizer(DTL_MEAN, DTL_STD, device) if prefetch else None
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            cache = PrefixCache.build(
                model, dataset, batch_size=args.batch_size_test, device=device,
                storage=args.cache_storage, dir=args.cache_dir, dtype=getattr(torch, args.cache_dtype),
                deterministic=get_benchmark(args.benchmark).train_transform_is_deterministic(),
                allow_approximate=args.cache_prefix_approx, num_workers=args.num_workers, preprocess=preprocess,
                autocast_dtype=autocast_dtype, log=_logger.info, budget_share=dist_info.local_world_size,
            )
        except PrefixCacheError as e:
            raise UsageError(f"--cache_prefix: {e}") from None
    info.build_s += cache.build_seconds
    info.mib = max(info.mib or 0.0, cache.nbytes / 2 ** 20)
    info.storage, info.approximate = cache.storage, cache.approximate
    _logger.info("prefix cache ready: %d images, %.1f MiB in %s, %.1fs to build (not counted in the epoch times)",
                 len(cache), cache.nbytes / 2 ** 20, cache.storage, cache.build_seconds)
    return cache


# -------------------------------------------------------------------------------------------------- loaders
class Loaders:
    """The loaders of a run: the training loader of a seed (images or the prefix cache, same sampler) and the
    evaluation loaders; with ``--prefetcher`` on CUDA, uint8 batches normalised on the device."""

    def __init__(self, args: argparse.Namespace, dist_info: DistInfo, prefetch: bool) -> None:
        self.args, self.dist, self.prefetch = args, dist_info, prefetch
        self.device = dist_info.device

    def train(self, dataset, seed: int, cache: Optional[PrefixCache] = None):
        per_proc = self.args.batch_size // self.dist.world_size
        if cache is not None:  # same sampler as below: the same images in the same batches
            return build_cache_train_loader(cache, per_proc, self.dist, seed,
                                            pin_memory=self.device.type == "cuda")
        loader = build_train_loader(dataset, per_proc, self.dist, seed, self.args.num_workers,
                                    pin_memory=self.device.type == "cuda")
        return CudaPrefetcher(loader, self.device, DTL_MEAN, DTL_STD) if self.prefetch else loader

    def eval(self, dataset):
        if dataset is None:
            return None
        loader = build_eval_loader(dataset, self.args.batch_size_test, self.dist, self.args.num_workers,
                                   pin_memory=self.device.type == "cuda")
        return CudaPrefetcher(loader, self.device, DTL_MEAN, DTL_STD) if self.prefetch else loader
