"""Everything a run builds before and around training, from its specs: the data of every seed (checked before
any model exists), the tuned model (from a :class:`~models.spec.ModelSpec`; ``--eval_only``: from the spec of a
delta checkpoint), the ``--initial_checkpoint``/``--lean``/``--cache_prefix`` pre-checks, the frozen-prefix cache
and the loaders."""
from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List, Optional, Sequence

import torch
import torch.nn as nn
from PIL import Image

from data.benchmark import DataPlan, DataRequest, SeedPlan, check_num_classes
from data.benchmarks import get_benchmark
from data.errors import DataError
from data.spec import DataSpec
from data.transforms import Uint8Normalizer, build_transform
from methods import get_method
from models import ModelSettingsError, create_tuned_model
from models.timm_api import set_normalization
from models.initial import InitialCheckpoint, check_initial_checkpoint
from models.spec import ModelSpec, thaw
from engine.prefix_cache import PrefixCache, PrefixCacheError
from engine.run_folder import CacheInfo
from engine.spec import FIELD_FLAGS, Experiment, OptimSpec, RunSpec
from utils.errors import CheckpointError, UsageError
from utils.distributed import DistInfo
from utils.loader import CudaPrefetcher, build_cache_train_loader, build_eval_loader, build_train_loader

__all__ = ["build_data", "backbone_label", "build_model", "check_model_flags",
           "build_prefix_cache", "Loaders"]

_logger = logging.getLogger("train")


# ------------------------------------------------------------------------------------------------------ data
def build_data(data: DataSpec, model: ModelSpec, *, need_train: bool, normalize: bool, batch_size: int) -> DataPlan:
    """Build (and cheaply check) every dataset of the run before any model exists.

    Missing folders / list files, malformed lines, out-of-range labels and missing image files raise
    :class:`DataError` naming the file and line; with ``--skip_bad_images`` every image is decoded once and the
    unreadable ones are dropped and counted. Unknown dataset/target names raise
    :class:`~data.errors.UnknownNameError`. The transforms normalise with the model's ``mean``/``std``
    (``normalize=False``: uint8 images, normalised on the device); ``batch_size`` is the global training batch.
    """
    bench = get_benchmark(data.benchmark)
    norm = dict(normalize=normalize, mean=model.mean, std=model.std)
    request = DataRequest(
        data_dir=data.data_dir, dataset=data.dataset, seeds=list(data.seeds), shot=data.shot,
        target=data.target_dataset,
        train_transform=build_transform(bench.name, True, img_size=data.img_size, **norm),
        test_transform=build_transform(bench.name, False, img_size=data.img_size, **norm),
        need_train=need_train, dataset_kwargs={"skip_bad_images": data.skip_bad_images},
        allow_overlap=data.allow_train_test_overlap)
    plan = bench.build(request)  # unknown names: data.errors.UnknownNameError, a user error
    check_num_classes(plan, data.num_classes)
    if data.skip_bad_images:
        plan.info["skipped_images"] = _verify_all(plan.seeds)
    elif data.check_images:
        _check_headers(plan.seeds)
    for seed in plan.seeds:
        if seed.train is not None and len(seed.train) < batch_size:
            raise DataError(f"{seed.train.list_path}: {len(seed.train)} training images are fewer than one batch "
                            f"of {batch_size} (incomplete batches are dropped); lower --batch_size")
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
def backbone_label(spec: ModelSpec) -> str:
    """``results.json``'s ``backbone``: the model name, with ``--model_kwargs`` when given (so that tables keep
    differently sized backbones apart)."""
    return spec.backbone + (f"[{_kwargs_text(spec)}]" if spec.backbone_kwargs else "")


def build_model(spec: ModelSpec, *, lean: bool = False, weights: bool = True) -> nn.Module:
    """The tuned model of ``spec`` (frozen backbone + trainable part) with the backbone weights of
    ``spec.weights`` (``weights=False``: without them, e.g. on the meta device to check settings);
    ``lean`` = ``--lean``."""
    load_path, pretrained = None, False
    if weights and spec.weights.kind == "timm":
        pretrained = True
        _logger.info("backbone: timm's published weights for %s (downloaded to timm's cache if needed)", spec.backbone)
    elif weights and spec.weights.kind == "file":
        load_path = spec.weights.source
    elif weights:
        _logger.warning("!" * 100)
        _logger.warning("!! --load_path is empty: the backbone is RANDOMLY INITIALISED (no pre-trained weights). "
                        "Results will be far below the paper's.")
        _logger.warning("!" * 100)
    method = get_method(spec.method)
    try:
        model = create_tuned_model(method.name, spec.backbone, spec.num_classes,
                                   settings=method.config_from_dict(spec.method_config), load_path=load_path,
                                   pretrained=pretrained, lean=lean, **spec.timm_kwargs())
    except ModelSettingsError as e:  # bad block ranges, an unknown backbone or timm argument, a baseline setting
        raise UsageError(f"cannot build --model {spec.backbone} --method {method.name}: {e}"
                         f"{_setting_flags_hint(str(e))}") from e
    except CheckpointError:  # the backbone weights (a file, or timm's published ones that cannot be downloaded)
        raise
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        if not spec.backbone_kwargs:  # without the user's own timm arguments this is a bug: keep its traceback
            raise
        raise UsageError(f"cannot build --model {spec.backbone} with --model_kwargs {_kwargs_text(spec)}: "
                         f"{type(e).__name__}: {_first_line(e)}") from e
    set_normalization(model, spec.mean, spec.std)  # what resolve_data_config on the model reports
    return model


def _setting_flags_hint(message: str) -> str:
    """`` (csn_blocks: --lora_before_blocks)`` for each method setting that ``message`` names by its configuration
    name where the flag has another name (the original's flag names), so that the error says what to change."""
    pairs = [(key.rsplit(".", 1)[1], flag) for key, flag in FIELD_FLAGS.items()
             if key.startswith("model.method_config.") and key.rsplit(".", 1)[1] != flag]
    named = [f"{name}: --{flag}" for name, flag in pairs if re.search(rf"\b{re.escape(name)}\b", message)]
    return f" ({', '.join(named)})" if named else ""

def _kwargs_text(spec: ModelSpec) -> str:
    """``--model_kwargs`` as written back: ``k=v`` pairs in key order."""
    return ",".join(f"{k}={v}" for k, v in sorted(thaw(spec.backbone_kwargs).items()))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def check_forward(model: nn.Module, spec: ModelSpec) -> None:
    """One forward of a meta-device ``model`` on a batch of ``spec.img_size`` images (costs nothing): an input
    size the backbone cannot take (``--img_size 8`` with 16-pixel patches, a Swin window that does not divide the
    grid) is a :class:`UsageError` before any folder or data loader exists."""
    x = torch.empty(2, 3, spec.img_size, spec.img_size, device="meta")
    try:
        with torch.no_grad():
            model.eval()(x)
    except NotImplementedError:  # an operator without a meta kernel: the real forward will tell
        return
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        raise UsageError(f"--img_size {spec.img_size} does not fit --model {spec.backbone}"
                         f"{' --model_kwargs ' + _kwargs_text(spec) if spec.backbone_kwargs else ''}: "
                         f"{type(e).__name__}: {_first_line(e)}") from None


def check_model_flags(exp: Experiment, initial: Optional[InitialCheckpoint] = None) -> None:
    """The model's settings and input size (:func:`check_forward`), the method's wiring, --initial_checkpoint,
    --lean, --cache_prefix: check them on the model's structure
    (built on the meta device: no memory, no weights) before the run folder, the data loaders or the real model
    exist. The method's own check (:meth:`methods.Method.check`; DTL: a block selection in which no tap
    reaches an add-back block would train the head alone, a linear probe recorded as DTL) runs whenever the
    model is built here."""
    run, spec = exp.run, exp.model
    if run.eval_only:
        used = [f for f, on in (("--lean", run.lean), ("--cache_prefix", run.cache_prefix)) if on]
        if used:
            _logger.info("%s only change training; --eval_only ignores them", " and ".join(used))
        return
    if initial is not None:
        check_initial_checkpoint(initial, lambda: build_model(spec, weights=False))
    method = get_method(spec.method)
    with torch.device("meta"):
        model = build_model(spec, lean=run.lean, weights=False)
    check_forward(model, spec)
    problem = method.check(model)
    if problem:
        raise UsageError(problem)
    if run.cache_prefix:
        deterministic = get_benchmark(exp.data.benchmark).train_transform_is_deterministic()
        try:
            reasons = PrefixCache.check_exact(model, deterministic=deterministic,
                                              allow_approximate=run.cache_prefix_approx)
        except PrefixCacheError as e:
            raise UsageError(f"--cache_prefix: {e}") from None
        for r in reasons:
            _logger.warning("--cache_prefix_approx: training is approximate: %s", r)


# --------------------------------------------------------------------------------------------- prefix cache
def build_prefix_cache(exp: Experiment, model: nn.Module, dataset, dist_info: DistInfo, prefetch: bool,
                       autocast_dtype: Optional[torch.dtype], info: CacheInfo) -> PrefixCache:
    """--cache_prefix: the frozen prefix over a seed's training images, computed once (rebuilt on resume) and
    added to ``info`` (the resume state's ``cache_info``). Every process builds its own cache; the RAM/disk
    budgets of ``--cache_storage auto/host/mmap`` are divided by the processes on this node.

    Built inside ``fork_rng``, so the random stream of training is the one of an uncached run."""
    device = dist_info.device
    run = exp.run
    preprocess = Uint8Normalizer(exp.model.mean, exp.model.std, device) if prefetch else None
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            cache = PrefixCache.build(
                model, dataset, batch_size=exp.optim.batch_size_test, device=device,
                storage=run.cache_storage, dir=run.cache_dir, dtype=getattr(torch, run.cache_dtype),
                deterministic=get_benchmark(exp.data.benchmark).train_transform_is_deterministic(),
                allow_approximate=run.cache_prefix_approx, num_workers=run.num_workers, preprocess=preprocess,
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
    evaluation loaders; with ``prefetch`` (``--prefetcher`` on CUDA), uint8 batches normalised on the device
    with the model's ``mean``/``std``."""

    def __init__(self, optim: OptimSpec, run: RunSpec, model: ModelSpec, dist_info: DistInfo, prefetch: bool) -> None:
        self.batch_size, self.batch_size_test = optim.batch_size, optim.batch_size_test
        self.num_workers = run.num_workers
        self.mean, self.std = model.mean, model.std
        self.dist, self.prefetch = dist_info, prefetch
        self.device = dist_info.device

    def _device_normalised(self, loader):
        if not self.prefetch:
            return loader
        return CudaPrefetcher(loader, self.device, Uint8Normalizer(self.mean, self.std, self.device))

    def train(self, dataset, seed: int, cache: Optional[PrefixCache] = None):
        per_proc = self.batch_size // self.dist.world_size
        if cache is not None:  # same sampler as below: the same images in the same batches
            return build_cache_train_loader(cache, per_proc, self.dist, seed,
                                            pin_memory=self.device.type == "cuda")
        return self._device_normalised(build_train_loader(dataset, per_proc, self.dist, seed, self.num_workers,
                                                          pin_memory=self.device.type == "cuda"))

    def eval(self, dataset):
        if dataset is None:
            return None
        return self._device_normalised(build_eval_loader(dataset, self.batch_size_test, self.dist, self.num_workers,
                                                         pin_memory=self.device.type == "cuda"))
