"""Frozen-prefix cache: compute the frozen blocks before DTL's first add-back block once per image.

Before the first add-back block ``a`` nothing trainable influences the tokens, so when the training transform
is deterministic (VTAB-1k: resize + centre crop, no augmentation) and those blocks have no stochastic depth,
the inputs ``x_i`` of blocks ``0..a`` are the same in every epoch.  :class:`PrefixCache` computes them once,
keeps the ones training needs -- the inputs of the side taps before ``a`` (their ``A_i``/``B_i`` train, so the
tap *inputs* are cached, not the tap outputs) and the input of block ``a`` -- in half precision, and every epoch
then runs only blocks ``a..L-1``::

    cache = PrefixCache.build(model, train_dataset, batch_size=64, device="cuda", deterministic=True)
    for cached, target in cache.batches(32, shuffle=True, drop_last=True, generator=g, device="cuda"):
        loss = criterion(model(cached), target)  # = model.forward_from_prefix(cached)

Storage precision: **float16** by default.  Block inputs of pre-trained ViTs before the middle of the network
are far inside float16's range (max 65504; the build checks every value and refuses on overflow, naming
``dtype=torch.bfloat16`` / ``float32`` as the way out), and float16 keeps 11 significant bits against
bfloat16's 8, i.e. an 8x smaller rounding error (relative 2^-11 ~ 4.9e-4 vs 2^-8 ~ 3.9e-3).  The fp16-autocast
training of every original launcher rounds these activations at least as coarsely.

Where the cache lives (``storage``): ``'device'`` (GPU memory), ``'host'`` (CPU RAM) or ``'mmap'`` (a
memory-mapped file in ``dir``, deleted when the cache is closed or the process exits).  ``'auto'`` picks the
first that fits: device if at most half of the free GPU memory, host if at most half of the available RAM,
else mmap if the disk has room; otherwise it refuses.  The size is printed before anything is computed.
``'host'`` keeps the cache in ordinary (pageable) memory -- pinning it would round every block up to a power of
two in torch's pinned allocator (ViT-B on VTAB-1k: 7 x 288.6 MiB held as 7 x 512 MiB) -- and
``gather(..., pin_memory=True)`` gathers each batch straight into a pinned buffer for an asynchronous copy to
the GPU.  Several processes on one node (``torchrun``) each hold their own cache: ``budget_share=k`` gives
each process 1/k of the available RAM and disk (the GPU budget is per device).

It refuses (:class:`PrefixCacheError`) when the cache would change training: a random training transform, or
stochastic operations (drop-path, dropout) in the prefix.  ``allow_approximate=True`` (``--cache_prefix_approx``)
accepts the approximation, which changes exactly this: (1) augmentation is frozen to one sample per image --
the one drawn while building the cache -- for every epoch; (2) the prefix blocks run as in evaluation
(no drop-path/dropout there); the tail blocks keep their stochastic depth.

The cache works with any model that provides ``prefix_plan()``, ``prefix_random_ops()``,
``record_block_inputs(images, blocks)`` and ``forward_from_prefix(cached)`` (see
:class:`models.dtl_vit.DTLVisionTransformer` and :class:`models.dtl_swin.DTLSwinTransformer`); it records "the
input of block ``i``" for global block indices (Swin: for a stage's first block, after its patch merging).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from utils import signals

__all__ = [
    "PrefixCache", "PrefixCacheDataset", "PrefixCacheError", "STORAGES", "transform_looks_random",
    "available_host_bytes", "format_bytes",
]

STORAGES = ("auto", "device", "host", "mmap")
# 'auto' uses at most this fraction of free GPU memory / available RAM (the rest is for training).
AUTO_FRACTION = 0.5
# An explicit storage choice may use up to this fraction.
EXPLICIT_FRACTION = 0.9
_REQUIRED = ("prefix_plan", "prefix_random_ops", "record_block_inputs", "forward_from_prefix")
# Class-name fragments of transforms that draw random numbers (torchvision / timm).
_RANDOM_TRANSFORM_NAMES = ("Random", "AutoAugment", "RandAugment", "TrivialAugment", "AugMix", "ColorJitter",
                           "Mixup", "CutMix", "GaussianBlur", "ElasticTransform")


class PrefixCacheError(ValueError):
    """The prefix cache cannot be built (it would not be exact, or it does not fit)."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} GiB"


def available_host_bytes() -> int:
    """RAM available for new allocations (``MemAvailable`` of ``/proc/meminfo``; sysconf elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def transform_looks_random(transform: Any) -> Optional[bool]:
    """Whether a (torchvision/timm) transform contains a random step, by class name; ``None`` if unknown.

    Walks ``Compose.transforms`` (and ``.transforms`` / ``.ops`` of nested containers).
    """
    if transform is None:
        return False
    seen = []

    def walk(t: Any) -> None:
        seen.append(type(t).__name__)
        for attr in ("transforms", "ops"):
            inner = getattr(t, attr, None)
            if isinstance(inner, (list, tuple)):
                for u in inner:
                    walk(u)

    walk(transform)
    if any(frag in name for name in seen for frag in _RANDOM_TRANSFORM_NAMES):
        return True
    known = ("Compose", "Resize", "CenterCrop", "ToTensor", "Normalize", "PILToTensor", "ConvertImageDtype",
             "ToDtype", "MaybeToTensor", "MaybePILToTensor", "ResizeKeepRatio", "Lambda", "ToImage", "ToPILImage")
    if all(name in known for name in seen):
        return False
    return None


def _pinned_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in pinned (page-locked) host memory (a seam for tests on machines without CUDA)."""
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=True)


def _device_free_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def _as_items(batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise PrefixCacheError("the dataset must yield (image, label) pairs")
    images, labels = batch[0], batch[1]
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    return images, labels


@torch.no_grad()
def _record(model, images, blocks, device, preprocess, autocast_dtype) -> Dict[int, torch.Tensor]:
    images = images.to(device, non_blocking=True)
    if preprocess is not None:
        images = preprocess(images)
    if autocast_dtype is not None:
        with torch.autocast(device_type=device.type, dtype=autocast_dtype):
            rec = model.record_block_inputs(images, blocks)
    else:
        rec = model.record_block_inputs(images, blocks)
    return {i: rec[i].float() for i in blocks}


def _choose_storage(storage: str, nbytes: int, device: torch.device, dir: Optional[str],
                    budget_share: int = 1) -> Tuple[str, str]:
    share = max(1, int(budget_share))
    gpu_free = _device_free_bytes(device)
    ram = available_host_bytes() // share
    disk_dir = dir or tempfile.gettempdir()
    disk = (shutil.disk_usage(disk_dir).free if os.path.isdir(disk_dir) else 0) // share
    need = format_bytes(nbytes) + (f" per process ({share} processes on this node, each with its share of "
                                   f"RAM and disk)" if share > 1 else "")
    if storage == "auto":
        if gpu_free is not None and nbytes <= AUTO_FRACTION * gpu_free:
            return "device", f"{format_bytes(gpu_free)} free on {device}"
        if nbytes <= AUTO_FRACTION * ram:
            return "host", f"{format_bytes(ram)} RAM available"
        if nbytes <= disk - (256 << 20):
            return "mmap", f"file in {disk_dir}, {format_bytes(disk)} free"
        raise PrefixCacheError(
            f"the prefix cache needs {need}, which fits nowhere: GPU "
            f"{format_bytes(gpu_free) + ' free' if gpu_free is not None else 'not used'}, RAM {format_bytes(ram)} "
            f"available, disk {format_bytes(disk)} free in {disk_dir}; use a smaller dataset or train without "
            "--cache_prefix"
        )
    if storage == "device":
        if gpu_free is None:
            return "host", f"device {device} is the CPU: 'device' = host memory, {format_bytes(ram)} available"
        if nbytes > EXPLICIT_FRACTION * gpu_free:
            raise PrefixCacheError(f"the prefix cache needs {need} but {device} has {format_bytes(gpu_free)} free")
        return "device", f"{format_bytes(gpu_free)} free on {device}"
    if storage == "host":
        if nbytes > EXPLICIT_FRACTION * ram:
            raise PrefixCacheError(f"the prefix cache needs {need} but only {format_bytes(ram)} RAM is available")
        return "host", f"{format_bytes(ram)} RAM available"
    if not os.path.isdir(disk_dir):
        raise PrefixCacheError(f"{disk_dir}: cache folder not found")
    if nbytes > disk - (256 << 20):
        raise PrefixCacheError(f"the prefix cache needs {need} but {disk_dir} has {format_bytes(disk)} free")
    return "mmap", f"file in {disk_dir}, {format_bytes(disk)} free"


def _allocate(storage, shapes, n, dtype, device, dir) -> Tuple[Dict[int, torch.Tensor], Optional[str]]:
    if storage == "device":
        return {i: torch.empty((n, *s), dtype=dtype, device=device) for i, s in shapes.items()}, None
    if storage == "host":  # pageable: gather() pins each batch instead (see the module docstring)
        return {i: torch.empty((n, *s), dtype=dtype) for i, s in shapes.items()}, None
    numels = {i: n * int(torch.Size(s).numel()) for i, s in shapes.items()}
    total = sum(numels.values())
    fd, path = tempfile.mkstemp(prefix="dtl_prefix_cache_", suffix=".bin", dir=dir)
    try:
        os.ftruncate(fd, total * torch.tensor([], dtype=dtype).element_size())
    finally:
        os.close(fd)
    flat = torch.from_file(path, shared=True, size=total, dtype=dtype)
    # The mapping stays valid after the name is removed; the disk space is freed when it is unmapped.
    os.unlink(path)
    out, off = {}, 0
    for i, s in shapes.items():
        out[i] = flat[off:off + numels[i]].view(n, *s)
        off += numels[i]
    return out, path


def _first_image(dataset: Dataset, check_repeatable: bool) -> torch.Tensor:
    """Image 0 of ``dataset`` as a tensor; with ``check_repeatable``, loaded twice and refused if the two differ
    (this catches random transforms that the transform-class check cannot see)."""
    def load() -> torch.Tensor:
        image = dataset[0][0]
        return image if isinstance(image, torch.Tensor) else torch.as_tensor(image)

    first = load()
    if check_repeatable and not torch.equal(first, load()):
        raise PrefixCacheError(
            "the training transform is not deterministic: image 0 came out differently twice; "
            "train without --cache_prefix or pass --cache_prefix_approx"
        )
    return first


def _fill(tensors: Dict[int, torch.Tensor], n: int, loader: DataLoader,
          record: Callable[[torch.Tensor], Dict[int, torch.Tensor]]) -> torch.Tensor:
    """Write ``record(images)`` (block index -> that block's inputs) of every batch of ``loader`` into
    ``tensors`` (block index -> an ``n x ...`` tensor of the storage dtype), in order, and return the ``n``
    labels. A block input that is not finite, or overflows the storage dtype, is refused naming the block and the
    images; so is a loader that yields another number of images than ``n``."""
    labels = torch.empty(n, dtype=torch.int64)
    offset = 0
    for batch in loader:
        images, target = _as_items(batch)
        b = images.shape[0]
        for i, t in record(images).items():
            if not torch.isfinite(t).all():
                raise PrefixCacheError(f"the input of block {i} is not finite for images {offset}..{offset + b - 1}")
            dtype = tensors[i].dtype
            q = t.to(dtype)
            if not torch.isfinite(q).all():
                raise PrefixCacheError(
                    f"the input of block {i} overflows {dtype} (max |x| = {t.abs().max().item():.4g}) for "
                    f"images {offset}..{offset + b - 1}; build with dtype=torch.bfloat16 or torch.float32"
                )
            tensors[i][offset:offset + b].copy_(q)
        labels[offset:offset + b] = target.to(torch.int64)
        offset += b
    if offset != n:
        raise PrefixCacheError(f"the data loader yielded {offset} images, the dataset has {n}")
    return labels


# --- use -----------------------------------------------------------------------------------------------


class PrefixCache:
    """Per-image inputs of the blocks before (and at) the first add-back block, stored once.

    Build with :meth:`build`.  Attributes: ``blocks`` (recorded block indices, the last one is ``resume``),
    ``resume``, ``tensors`` (block -> ``n x ...`` tensor in ``dtype``), ``labels`` (int64, ``n``),
    ``storage`` ('device' | 'host' | 'mmap'), ``nbytes``, ``build_seconds``.
    """

    def __init__(
        self,
        tensors: Dict[int, torch.Tensor],
        labels: torch.Tensor,
        blocks: Sequence[int],
        resume: int,
        storage: str,
        approximate: bool = False,
        path: Optional[str] = None,
    ) -> None:
        self.tensors = tensors
        self.labels = labels
        self.blocks = list(blocks)
        self.resume = resume
        self.storage = storage
        self.approximate = approximate
        self.path = path
        self.build_seconds = 0.0

    # --- construction ------------------------------------------------------------------------------------
    @staticmethod
    def check_exact(
        model: nn.Module, dataset: Optional[Dataset] = None, deterministic: Optional[bool] = None,
        allow_approximate: bool = False,
    ) -> List[str]:
        """Reasons why a cache would change training (empty list: exact). Raises unless ``allow_approximate``."""
        missing = [m for m in _REQUIRED if not callable(getattr(model, m, None))]
        if missing:
            raise PrefixCacheError(
                f"{type(model).__name__} does not support the prefix cache (it lacks {', '.join(missing)}); "
                "it is available for DTL models only"
            )
        reasons: List[str] = []
        if deterministic is None:
            transform = getattr(dataset, "transform", None) if dataset is not None else None
            looks_random = transform_looks_random(transform)
            if looks_random is None:
                raise PrefixCacheError(
                    f"cannot tell whether the training transform {transform!r} is deterministic; pass "
                    "deterministic=True/False (train.py: data.transforms.transform_is_deterministic)"
                )
            deterministic = not looks_random
        if not deterministic:
            reasons.append("the training transform is random (augmentation would be frozen to one sample per image)")
        ops = model.prefix_random_ops()
        if ops:
            reasons.append("the prefix blocks have stochastic operations that the cache disables: " + ", ".join(ops))
        if reasons and not allow_approximate:
            raise PrefixCacheError(
                "the frozen-prefix cache would change training: " + "; ".join(reasons)
                + ". Train without --cache_prefix, or accept the approximation with --cache_prefix_approx "
                "(allow_approximate=True)"
            )
        return reasons

    @classmethod
    def build(
        cls,
        model: nn.Module,
        dataset: Dataset,
        batch_size: int = 64,
        device: Union[str, torch.device] = "cpu",
        storage: str = "auto",
        dir: Optional[str] = None,
        dtype: torch.dtype = torch.float16,
        deterministic: Optional[bool] = None,
        allow_approximate: bool = False,
        num_workers: int = 0,
        preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        log: Optional[Callable[[str], None]] = print,
        budget_share: int = 1,
    ) -> "PrefixCache":
        """Run the frozen prefix once over ``dataset`` (in its order) and store the block inputs.

        Args:
            model: a DTL model (see the module docstring for the methods it needs), already on ``device``.
            dataset: yields ``(image, label)``; its index order is the cache's order, so a sampler over the
                cache draws the same batches as over the dataset.
            batch_size: images per prefix forward while building.
            device: where the prefix runs (and where ``storage='device'`` keeps the cache).
            storage: 'auto' | 'device' | 'host' | 'mmap' (see the module docstring).
            dir: folder of the memory-mapped file (default: the system temp folder).
            dtype: storage dtype: float16 (default), bfloat16 or float32.
            deterministic: whether the training transform is deterministic; ``None`` = inspect
                ``dataset.transform``.  Every build also loads image 0 twice and refuses if they differ.
            allow_approximate: build even when the cache is not exact (see the module docstring).
            num_workers: DataLoader workers for reading the images.
            preprocess: applied to each image batch on ``device`` (e.g. normalising uint8 batches).
            autocast_dtype: run the prefix under ``torch.autocast`` with this dtype (e.g. float16 on a GPU).
            log: called with the size/storage line and the summary (``None``: silent).
            budget_share: processes on this node that each build a cache (``torchrun``'s local world size):
                the RAM and disk budgets are divided by it.
        """
        if storage not in STORAGES:
            raise PrefixCacheError(f"unknown cache storage {storage!r}; choose from {', '.join(STORAGES)}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise PrefixCacheError(f"cache dtype must be float16, bfloat16 or float32, got {dtype}")
        device = torch.device(device)
        reasons = cls.check_exact(model, dataset, deterministic, allow_approximate)
        n = len(dataset)
        if n == 0:
            raise PrefixCacheError("the dataset is empty")
        first = _first_image(dataset, check_repeatable=not reasons)
        blocks, resume = model.prefix_plan()
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            probe = _record(model, first.unsqueeze(0), blocks, device, preprocess, autocast_dtype)
            shapes = {i: tuple(t.shape[1:]) for i, t in probe.items()}
            item = torch.tensor([], dtype=dtype).element_size()
            per_image = sum(int(torch.Size(s).numel()) for s in shapes.values()) * item
            nbytes = per_image * n
            storage, where = _choose_storage(storage, nbytes, device, dir, budget_share)
            if log:
                shape_txt = ", ".join(f"{i}: {'x'.join(map(str, s))}" for i, s in shapes.items())
                log(f"prefix cache: {n} images x inputs of blocks {blocks} ({shape_txt}) in "
                    f"{str(dtype).replace('torch.', '')} = {format_bytes(nbytes)} -> {storage} ({where}); "
                    f"training resumes at block {resume}")
                for r in reasons:
                    log(f"prefix cache: APPROXIMATE (allowed): {r}")
            tensors, path = _allocate(storage, shapes, n, dtype, device, dir)
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers,
                                worker_init_fn=signals.worker_init if num_workers else None)
            labels = _fill(tensors, n, loader,
                           lambda images: _record(model, images, blocks, device, preprocess, autocast_dtype))
        finally:
            model.train(was_training)
        cache = cls(tensors, labels, blocks, resume, storage, approximate=bool(reasons), path=path)
        cache.build_seconds = time.perf_counter() - t0
        if log:
            log(f"prefix cache: built in {cache.build_seconds:.1f}s")
        return cache

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def dataset(self) -> "PrefixCacheDataset":
        """A map-style dataset over the cache: item ``i`` is ``({block: tensor}, label)`` of image ``i``."""
        return PrefixCacheDataset(self)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        generator: Optional[torch.Generator] = None,
        device: Union[None, str, torch.device] = None,
    ) -> Iterator[Tuple[Dict[int, torch.Tensor], torch.Tensor]]:
        """Batches ``({block: B x ...}, labels)`` gathered by index (faster than a DataLoader over
        :meth:`dataset`); the order is ``torch.randperm(n, generator=generator)`` when shuffling, as a
        ``RandomSampler`` with that generator draws it.  (A ``DataLoader(shuffle=True, generator=g)`` first
        draws a worker seed from ``g``, so its order differs: to reproduce a DataLoader's batches exactly, use a
        DataLoader over :meth:`dataset` with the same sampler settings.)"""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield self.gather(idx, device)

    def gather(self, idx: torch.Tensor, device: Union[None, str, torch.device] = None, pin_memory: bool = False):
        """The cached inputs and labels of images ``idx`` (CPU int64), moved to ``device``.

        ``idx`` is copied once to each storage device (not once per tensor). ``pin_memory``: host-stored
        tensors and the labels are gathered directly into pinned buffers (for an asynchronous copy to a GPU;
        needs CUDA)."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        on_device: Dict[torch.device, torch.Tensor] = {idx.device: idx}

        def select(t: torch.Tensor) -> torch.Tensor:
            if pin_memory and t.device.type == "cpu":
                return torch.index_select(t, 0, idx, out=_pinned_empty((idx.numel(), *t.shape[1:]), t.dtype))
            if t.device not in on_device:
                src = idx.pin_memory() if t.device.type == "cuda" and pin_memory else idx
                on_device[t.device] = src.to(t.device, non_blocking=True)
            return t.index_select(0, on_device[t.device])

        out = {}
        for i, t in self.tensors.items():
            sel = select(t)
            out[i] = sel.to(device, non_blocking=True) if device is not None else sel
        labels = select(self.labels)
        return out, (labels.to(device, non_blocking=True) if device is not None else labels)

    def close(self) -> None:
        """Release the stored tensors (and with them a memory-mapped file)."""
        self.tensors = {}

    def __repr__(self) -> str:
        return (f"PrefixCache(n={len(self)}, blocks={self.blocks}, resume={self.resume}, storage={self.storage}, "
                f"{format_bytes(self.nbytes)}{', approximate' if self.approximate else ''})")


class PrefixCacheDataset(Dataset):
    """Map-style view of a :class:`PrefixCache`: ``({block: tensor}, label)`` per image (collates to dicts)."""

    def __init__(self, cache: PrefixCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int):
        return {i: t[index] for i, t in self.cache.tensors.items()}, int(self.cache.labels[index])
