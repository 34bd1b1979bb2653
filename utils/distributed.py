"""Single-process and ``torchrun`` (DDP) execution: process-group setup, rank helpers, reductions, samplers.

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them everything runs in one process and
every helper here degrades to a no-op. The backend is NCCL on CUDA and gloo on the CPU (used by the tests).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, List

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .lifetime import exit_with_parent

__all__ = [
    "DistInfo", "init_distributed", "cleanup_distributed", "is_distributed", "barrier",
    "all_reduce_sum", "broadcast_object", "all_gather_object", "ShardSampler", "resolve_device",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, its ``local_rank`` of
    ``local_world_size`` processes on this node, and ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``--device``: ``auto`` (the process's CUDA device when there is one, else the CPU), ``cpu``, ``cuda``,
    ``cuda:N``.

    The GPU of a process is ``N + local_rank`` (``cuda`` and ``auto``: ``N = 0``): one process, or process
    ``LOCAL_RANK`` of a ``torchrun`` node, counting from GPU ``N`` of the visible ones -- ``--device cuda:2`` with
    ``--nproc_per_node 2`` trains on GPUs 2 and 3. A GPU past the last visible one is an error naming both
    numbers (``CUDA_VISIBLE_DEVICES`` chooses which GPUs are visible)."""
    from .errors import UsageError

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise UsageError(f"--device {spec}: not a device ({e}); use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        index = (device.index or 0) + local_rank
        count = torch.cuda.device_count()
        if index >= count:
            where = f" + LOCAL_RANK {local_rank}" if local_rank else ""
            raise UsageError(f"--device {spec}: this process would use GPU {device.index or 0}{where} = {index}, "
                             f"but only {count} GPU(s) are visible (GPUs 0..{count - 1}; CUDA_VISIBLE_DEVICES "
                             f"selects them); lower N or --nproc_per_node")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UsageError(f"--device {spec}: only cpu and cuda devices are supported")
    return device


def init_distributed(device_spec: str = "auto", timeout_min: float = 30.0) -> DistInfo:
    """Start the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); pick the device. A torchrun
    worker also arranges to end when the torchrun agent dies (:func:`exit_with_parent`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        exit_with_parent()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1" if world_size == 1 else str(world_size)))
    device = resolve_device(device_spec, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                    local_world_size=local_world_size)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes (in place; also returned). A no-op in one process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    """The list of every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank ``r`` of ``n`` gets indices ``r, r+n, r+2n, ...`` in order, without padding.

    Unlike ``DistributedSampler`` it never repeats a sample to even out the shards, so a metric summed over
    ranks counts every image exactly once.
    """

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1) -> None:
        self.dataset_len = dataset_len
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.world_size))
