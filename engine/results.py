"""The numbers of results.json: per-seed results, their mean/std, parameter counts, time and memory.

Keys (every run): ``benchmark``, ``dataset``, ``backbone``, ``method``, ``top1`` (mean over seeds of the primary
split's top-1), ``top1_std`` (sample std, None for one seed), ``epochs``, ``n_params``, ``n_trainable``,
``n_trainable_excl_head``, ``peak_memory_mib`` (CUDA, max over ranks), ``peak_rss_mib``, ``train_time_s``,
``images_per_s``, ``per_seed`` (``seed``, ``top1``, ``best_val``, ``best_epoch``, ``n_test_images``[, ``targets``]),
``n_test_images``, ``lean``, ``cache_prefix``, ``cache_build_s``, ``cache_mib``, ``cache_storage``,
``cache_approximate``, the benchmark's ``info`` (``shot``, DG ``source``/``target``), ``per_target`` when several
splits were evaluated; :class:`engine.run_folder.RunFolder` adds ``versions``, ``args``, ``output_dir``,
``world_size`` and ``finished_at``.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Mapping, Optional

import torch

from engine.run_folder import CacheInfo
from utils.distributed import all_gather_object
from utils.metrics import mean_std, peak_cuda_mib, peak_rss_mib

__all__ = ["seed_result", "run_results", "resources", "memory_flags", "parameter_counts"]


def parameter_counts(c) -> Dict[str, int]:
    """results.json's counts from :func:`models.count_parameters`."""
    return {"n_params": c.total, "n_trainable": c.trainable, "n_trainable_excl_head": c.trainable_excl_head}


def seed_result(seed: Optional[int], final: Mapping[str, Dict[str, float]], primary: str,
                best_val: Optional[float] = None, best_epoch: Optional[int] = None) -> Dict[str, Any]:
    """One entry of ``per_seed``: the primary split's top-1 and, with several splits, every split's."""
    res = {"seed": seed, "top1": final[primary]["top1"], "best_val": best_val, "best_epoch": best_epoch,
           "n_test_images": {k: v["n"] for k, v in final.items()}}
    if len(final) > 1:
        res["targets"] = {k: v["top1"] for k, v in final.items()}
    return res


def resources(device: torch.device) -> Dict[str, Any]:
    """Peak CUDA memory and peak resident memory, the maxima over all ranks."""
    peaks = all_gather_object((peak_cuda_mib(device), peak_rss_mib()))
    cuda = [p[0] for p in peaks if p[0] is not None]
    return {"peak_memory_mib": round(max(cuda), 1) if cuda else None,
            "peak_rss_mib": round(max(p[1] for p in peaks), 1)}


def memory_flags(args: argparse.Namespace, cache_info: CacheInfo) -> Dict[str, Any]:
    """``lean``/``cache_prefix`` and, with the cache, its build time (all seeds, not in ``train_time_s``),
    size (MiB, one seed's cache), storage and whether it was approximate."""
    on = bool(args.cache_prefix) and not args.eval_only
    return {"lean": bool(args.lean) and not args.eval_only, "cache_prefix": on,
            "cache_build_s": round(float(cache_info.build_s), 3) if on else None,
            "cache_mib": round(float(cache_info.mib), 3) if on and cache_info.mib is not None else None,
            "cache_storage": cache_info.storage if on else None,
            "cache_approximate": cache_info.approximate if on else None}


def run_results(args: argparse.Namespace, *, method: str, backbone: str, per_seed: List[Dict[str, Any]],
                epochs: int, counts: Mapping[str, int], train_time: float, train_images: int,
                cache_info: CacheInfo, info: Mapping[str, Any], device: torch.device,
                **extra: Any) -> Dict[str, Any]:
    """The whole results.json body (see the module docstring); ``extra`` entries go before ``info``'s."""
    stats = mean_std([c["top1"] for c in per_seed])
    res: Dict[str, Any] = {
        "benchmark": args.benchmark,
        "dataset": args.dataset,
        "backbone": backbone,
        "method": method,
        "top1": stats["mean"],
        "top1_std": stats["std"],
        "epochs": epochs,
        **counts,
        **resources(device),
        "train_time_s": round(train_time, 3),
        "images_per_s": round(train_images / train_time, 2) if train_time > 0 else None,
        "per_seed": per_seed,
        "n_test_images": per_seed[-1]["n_test_images"] if per_seed else None,
        **memory_flags(args, cache_info),
        **extra,
        **info,
    }
    if any("targets" in c for c in per_seed):
        names = list(per_seed[0]["targets"])
        res["per_target"] = {}
        for t in names:
            ms = mean_std([c["targets"][t] for c in per_seed])
            res["per_target"][t] = {"top1": ms["mean"], "top1_std": ms["std"]}
    return res
