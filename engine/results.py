"""The numbers of results.json: per-seed results, their mean/std, parameter counts, time and memory.

Keys (every run): ``benchmark``, ``dataset``, ``backbone``, ``method``, ``top1`` (mean over seeds of the primary
split's top-1), ``top1_std`` (sample std, None for one seed), ``epochs``, ``n_params``, ``n_trainable``,
``n_trainable_excl_head``, ``precision`` (what the forward passes actually ran in: ``fp32``, ``fp16`` or
``bf16``; ``--amp`` with float16 on a CPU trains in fp32), the CUDA memory peaks (MiB of
``torch.cuda.max_memory_allocated``, max over ranks, ``None`` off CUDA; :class:`utils.metrics.PeakMemory`):
``peak_memory_mib`` = the *training* peak (the counter is reset before every training epoch -- after the prefix
cache is built -- and read at its end, before any evaluation: the number the paper compares; with
``--eval_only`` the evaluation peak), ``peak_memory_eval_mib`` (validation/test evaluation at
``--batch_size_test``), ``peak_memory_cache_build_mib`` (building the prefix cache), ``peak_memory_run_mib`` (the
whole invocation, everything included: what ``peak_memory_mib`` meant before), ``peak_rss_mib``, ``train_time_s``,
``images_per_s``, ``per_seed`` (``seed``, ``top1``, ``best_val``, ``best_epoch``, ``n_test_images``[, ``targets``]),
``n_test_images``, ``lean``, ``cache_prefix``, ``cache_build_s``, ``cache_mib``, ``cache_storage``,
``cache_approximate``, the benchmark's ``info`` (``shot``, DG ``source``/``target``), ``per_target`` when several
splits were evaluated; :class:`engine.run_folder.RunFolder` adds ``versions``, ``args``, ``specs`` (the four
spec sections), ``output_dir``,
``world_size`` and ``finished_at``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from engine.run_folder import CacheInfo
from engine.spec import Experiment, RunSpec
from utils.distributed import all_gather_object
from utils.metrics import PeakMemory, mean_std, peak_rss_mib

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


def resources(peaks: PeakMemory, eval_only: bool = False) -> Dict[str, Any]:
    """The CUDA memory peaks per phase and the peak resident memory, the maxima over all ranks (every rank
    calls)."""
    peaks.finish()
    gathered = all_gather_object((peaks.mib(), peak_rss_mib()))

    def top(phase: str) -> Optional[float]:
        vals = [g[0][phase] for g in gathered if g[0].get(phase) is not None]
        return round(max(vals), 1) if vals else None

    return {"peak_memory_mib": top("eval" if eval_only else "train"), "peak_memory_eval_mib": top("eval"),
            "peak_memory_cache_build_mib": top("cache_build"), "peak_memory_run_mib": top("run"),
            "peak_rss_mib": round(max(g[1] for g in gathered), 1)}


def memory_flags(run: RunSpec, cache_info: CacheInfo) -> Dict[str, Any]:
    """``lean``/``cache_prefix`` and, with the cache, its build time (all seeds, not in ``train_time_s``),
    size (MiB, one seed's cache), storage and whether it was approximate."""
    on = run.cache_prefix and not run.eval_only
    return {"lean": run.lean and not run.eval_only, "cache_prefix": on,
            "cache_build_s": round(float(cache_info.build_s), 3) if on else None,
            "cache_mib": round(float(cache_info.mib), 3) if on and cache_info.mib is not None else None,
            "cache_storage": cache_info.storage if on else None,
            "cache_approximate": cache_info.approximate if on else None}


def run_results(exp: Experiment, *, method: str, backbone: str, per_seed: List[Dict[str, Any]],
                epochs: int, counts: Mapping[str, int], train_time: float, train_images: int,
                cache_info: CacheInfo, info: Mapping[str, Any], peaks: PeakMemory, precision: str,
                **extra: Any) -> Dict[str, Any]:
    """The whole results.json body (see the module docstring); ``extra`` entries go before ``info``'s."""
    stats = mean_std([c["top1"] for c in per_seed])
    res: Dict[str, Any] = {
        "benchmark": exp.data.benchmark,
        "dataset": exp.data.dataset,
        "backbone": backbone,
        "method": method,
        "top1": stats["mean"],
        "top1_std": stats["std"],
        "epochs": epochs,
        **counts,
        "precision": precision,
        **resources(peaks, eval_only=exp.run.eval_only),
        "train_time_s": round(train_time, 3),
        "images_per_s": round(train_images / train_time, 2) if train_time > 0 else None,
        "per_seed": per_seed,
        "n_test_images": per_seed[-1]["n_test_images"] if per_seed else None,
        **memory_flags(exp.run, cache_info),
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
