"""Backend settings of a run: cuDNN autotuning (the default, as the original) or ``--deterministic``.

By default a CUDA run sets ``torch.backends.cudnn.benchmark = True``: cuDNN times several convolution algorithms
and keeps the fastest, which can differ between runs and processes, and several CUDA kernels (the fused
scaled-dot-product-attention backward, atomic-add reductions such as ``index_add``) sum in an order that varies
from run to run. Two GPU runs with the same seed -- or a resumed run and an uninterrupted one -- therefore agree
to rounding, not bitwise. CPU runs are bitwise reproducible with or without this flag.

``--deterministic`` (:func:`configure_backends`):

* ``torch.use_deterministic_algorithms(True)``: an operation without a deterministic implementation raises an
  error naming it (instead of silently varying);
* ``torch.backends.cudnn.benchmark = False`` and ``torch.backends.cudnn.deterministic = True``;
* ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (required by cuBLAS for reproducible matrix products; a value already in
  the environment is kept; it is read when cuBLAS starts, i.e. at the first matrix product, after this call);
* scaled-dot-product attention restricted to its math implementation (the flash / memory-efficient / cuDNN
  kernels accumulate their backward atomically); this costs speed and, for long token sequences, memory.

Use it to check resumption or to compare code changes on a GPU; train the reported numbers without it.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

__all__ = ["configure_backends", "CUBLAS_WORKSPACE"]

_logger = logging.getLogger("train")

CUBLAS_WORKSPACE = ":4096:8"


def configure_backends(deterministic: bool, device: Optional[torch.device] = None) -> None:
    """Set the backend flags of a run on ``device`` (see the module docstring); call before any CUDA work."""
    cuda = device is not None and device.type == "cuda"
    if not deterministic:
        if cuda:
            torch.backends.cudnn.benchmark = True
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    for name in ("enable_flash_sdp", "enable_mem_efficient_sdp", "enable_cudnn_sdp"):
        fn = getattr(torch.backends.cuda, name, None)
        if fn is not None:
            fn(False)
    torch.backends.cuda.enable_math_sdp(True)
    if cuda:
        _logger.info("--deterministic: deterministic algorithms, cuDNN without autotuning, math attention, "
                     "CUBLAS_WORKSPACE_CONFIG=%s (slower)", os.environ["CUBLAS_WORKSPACE_CONFIG"])
