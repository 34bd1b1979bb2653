"""Training-memory accounting that works on any device, the CPU included.

The memory a tuning method saves is the memory autograd *keeps for backward*: activations that some trainable
tensor's gradient needs.  :class:`SavedTensorMeter` counts exactly that during a forward pass, with
``torch.autograd.graph.saved_tensors_hooks``:

- every tensor autograd saves is seen by the pack hook;
- it is counted by its **storage** (``untyped_storage()``), each storage once, with the storage's full
  ``nbytes`` (views of one buffer -- e.g. q, k, v unbound from one qkv output -- are one storage);
- storages of the model's parameters and buffers are excluded (they exist whether or not we train);
  storages created *from* parameters during the forward (an autocast fp16 copy of a weight, a transposed
  copy) are not parameter storages and are counted, since they, too, are held until backward.

The meter keeps a reference to every saved tensor until it is closed, so that no storage can be freed and its
address reused by another storage within one measurement (which would make two storages count as one).

Typical use::

    mib = saved_tensor_mib(model, images)          # one training forward, nothing else
    with SavedTensorMeter(model) as meter:          # or around any forward you run yourself
        loss = criterion(model(images), target)
    print(meter.mib, meter.count)
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Set

import torch
import torch.nn as nn

__all__ = ["SavedTensorMeter", "saved_tensor_mib", "storage_key", "MIB"]

MIB = float(1 << 20)


def storage_key(t: torch.Tensor) -> Optional[tuple]:
    """``(device, data_ptr)`` of the storage behind ``t``; ``None`` for tensors without a plain storage."""
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse / nested / functional wrapper tensors
        return None
    return (str(t.device), st.data_ptr())


class SavedTensorMeter:
    """Context manager that counts the distinct non-parameter storages autograd saves for backward.

    Args:
        exclude: modules whose parameters and buffers are not counted, or tensors to exclude; usually the
            model being trained.
        keep_alive: hold a reference to every saved tensor until ``__exit__`` (default), so storage addresses
            cannot be reused during the measurement.

    After the ``with`` block: ``nbytes`` (total bytes of distinct saved storages), ``mib``, ``count`` (number
    of distinct storages), ``by_size`` (storage key -> bytes), ``n_saved`` (pack-hook calls, duplicates included),
    ``n_excluded`` (saved tensors that were parameters/buffers).
    """

    def __init__(self, *exclude: "nn.Module | torch.Tensor | Iterable[torch.Tensor]", keep_alive: bool = True) -> None:
        self._exclude: Set[tuple] = set()
        for item in exclude:
            tensors: Iterable[torch.Tensor]
            if isinstance(item, nn.Module):
                tensors = list(item.parameters()) + list(item.buffers())
            elif isinstance(item, torch.Tensor):
                tensors = [item]
            else:
                tensors = list(item)
            for t in tensors:
                key = storage_key(t)
                if key is not None:
                    self._exclude.add(key)
        self.keep_alive = keep_alive
        self.by_size: Dict[tuple, int] = {}
        self.n_saved = 0
        self.n_excluded = 0
        self.n_unaccounted = 0
        self._alive: List[torch.Tensor] = []
        self._ctx: Optional[torch.autograd.graph.saved_tensors_hooks] = None

    # pack/unpack: observe, never alter
    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.n_saved += 1
        key = storage_key(t)
        if key is None:
            self.n_unaccounted += 1
        elif key in self._exclude:
            self.n_excluded += 1
        elif key not in self.by_size:
            self.by_size[key] = t.untyped_storage().nbytes()
            if self.keep_alive:
                self._alive.append(t)
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> "SavedTensorMeter":
        self.by_size.clear()
        self._alive.clear()
        self.n_saved = self.n_excluded = self.n_unaccounted = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        assert self._ctx is not None
        self._ctx.__exit__(*exc)
        self._ctx = None
        self._alive.clear()

    @property
    def nbytes(self) -> int:
        return sum(self.by_size.values())

    @property
    def mib(self) -> float:
        return self.nbytes / MIB

    @property
    def count(self) -> int:
        return len(self.by_size)


def saved_tensor_mib(
    model: nn.Module,
    x: torch.Tensor,
    loss_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    train: bool = True,
) -> float:
    """MiB of distinct non-parameter storages saved for backward in one forward of ``model`` on ``x``.

    The model is put in training mode (``train=True``, the default: dropout/drop-path masks are what training
    keeps) and restored afterwards. ``loss_fn`` maps the output to the loss, whose saved tensors then count too
    (default: none, only the model's forward is measured). ``autocast_dtype`` runs the forward under
    ``torch.autocast`` of ``x``'s device type. No backward is run; the graph is freed.
    """
    was_training = model.training
    model.train(train)
    try:
        with SavedTensorMeter(model) as meter:
            ctx = (
                torch.autocast(device_type=x.device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else torch.autocast(device_type=x.device.type, enabled=False)
            )
            with ctx:
                out = model(x)
                if loss_fn is not None:
                    out = loss_fn(out)
        del out
    finally:
        model.train(was_training)
    return meter.mib
