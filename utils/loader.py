"""Data loaders with a resumable order, exact distributed evaluation, and a CUDA prefetcher.

Training: a ``DistributedSampler`` (also in one process, with one replica) shuffles with the generator seeded
by ``seed + epoch``, so the order of epoch ``e`` does not depend on what ran before; the loader's own generator
(which seeds the workers' augmentation RNGs) is re-seeded from ``(seed, rank, epoch)`` at every epoch.
A run resumed at epoch ``e`` therefore sees exactly the batches an uninterrupted run sees.  Incomplete last
batches are dropped (the original recipe).

Evaluation: :class:`~utils.distributed.ShardSampler` splits the images over the ranks without padding.

``--cache_prefix``: :func:`build_cache_train_loader` draws the batches of a
:class:`~engine.prefix_cache.PrefixCache` with the same sampler, so the cached run sees the same images in the
same batches as the uncached one.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler


from . import signals
from .distributed import DistInfo, ShardSampler

__all__ = ["build_train_loader", "build_eval_loader", "set_epoch", "CudaPrefetcher", "epoch_seed",
           "build_cache_train_loader", "CacheBatchLoader"]


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A 63-bit seed that is a fixed function of ``(seed, rank, epoch)``."""
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, rank, epoch])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _train_sampler(dataset: Dataset, dist_info: DistInfo, seed: int) -> Tuple[DistributedSampler, torch.Generator]:
    """The shuffling sampler of the training data (the same for images and the prefix cache) and the loader's
    generator, seeded for epoch 0."""
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True,
                                 seed=seed, drop_last=False)
    generator = torch.Generator()
    generator.manual_seed(epoch_seed(seed, dist_info.rank, 0))
    return sampler, generator


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    dist_info: DistInfo,
    seed: int,
    num_workers: int = 4,
    pin_memory: bool = False,
) -> DataLoader:
    """Shuffled, ``drop_last`` training loader; ``batch_size`` is per process."""
    sampler, generator = _train_sampler(dataset, dist_info, seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        generator=generator,
        persistent_workers=False,
        worker_init_fn=signals.worker_init if num_workers else None,
    )


class CacheBatchLoader:
    """Training batches ``({block: B x ...}, labels)`` of a prefix cache, in the order of ``sampler``.

    Batches are cut from the sampler's indices exactly as a ``DataLoader(batch_size=..., sampler=sampler,
    drop_last=True)`` over ``cache.dataset()`` cuts them, but gathered with one ``index_select`` per cached
    tensor instead of one item at a time.  ``generator`` is kept only so that :func:`set_epoch` treats this
    like the image loader (there are no workers to seed).  ``pin_memory``: gather a host-stored cache's batches
    into pinned memory (the cache itself stays in pageable memory), so that the copy to the GPU is asynchronous.
    """

    def __init__(self, cache, sampler: Sampler, batch_size: int, generator: Optional[torch.Generator] = None,
                 pin_memory: bool = False) -> None:
        self.cache = cache
        self.pin_memory = pin_memory
        self.sampler = sampler
        self.batch_size = batch_size
        self.generator = generator
        self.batch_sampler = BatchSampler(sampler, batch_size, drop_last=True)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for idx in self.batch_sampler:
            yield self.cache.gather(torch.as_tensor(idx, dtype=torch.int64), pin_memory=self.pin_memory)


def build_cache_train_loader(cache, batch_size: int, dist_info: DistInfo, seed: int,
                             pin_memory: bool = False) -> CacheBatchLoader:
    """The cache counterpart of :func:`build_train_loader` (same sampler settings, so the same batches)."""
    sampler, generator = _train_sampler(cache.dataset(), dist_info, seed)
    return CacheBatchLoader(cache, sampler, batch_size, generator, pin_memory=pin_memory)


def set_epoch(loader: DataLoader, epoch: int, seed: int, rank: int) -> None:
    """Fix the data order and the workers' seeds of ``epoch`` (call before iterating)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(seed, rank, epoch))


def build_eval_loader(
    dataset: Dataset,
    batch_size: int,
    dist_info: DistInfo,
    num_workers: int = 4,
    pin_memory: bool = False,
) -> DataLoader:
    """In-order evaluation loader; every image is seen by exactly one rank."""
    sampler = ShardSampler(len(dataset), dist_info.rank, dist_info.world_size)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        worker_init_fn=signals.worker_init if num_workers else None,
        drop_last=False,
    )


class CudaPrefetcher:
    """Iterate a loader of uint8 image batches, copying the next batch to the GPU and normalising it there with
    ``normalize`` (e.g. :class:`data.transforms.Uint8Normalizer`, its constants made on the device once:
    bit-identical to the CPU ``ToTensor + Normalize`` path) on a side stream while the current batch is being
    used. The loader should pin its batches (``pin_memory=True``) so that the copies are asynchronous."""

    def __init__(self, loader: DataLoader, device: torch.device,
                 normalize: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.loader = loader
        self.device = device
        self.normalize = normalize
        self.stream: Optional[torch.cuda.Stream] = None

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def generator(self):
        return self.loader.generator

    def _to_device(self, batch: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        return self.normalize(x), y

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=self.device)
        consumer = torch.cuda.current_stream(self.device)
        pending = None
        with signals.deferred():  # starting the workers (see Trainer._batches)
            batches = iter(self.loader)
        for batch in batches:
            self.stream.wait_stream(consumer)
            with torch.cuda.stream(self.stream):
                nxt = self._to_device(batch)
            if pending is not None:
                yield pending
            consumer.wait_stream(self.stream)
            for t in nxt:
                t.record_stream(consumer)
            pending = nxt
        if pending is not None:
            yield pending
