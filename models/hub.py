"""Share a trained DTL model as a *delta-only* folder, the way peft shares adapters.

Only the side network and the head train (~0.1 M tensors), so a result is the backbone's name and weights record
plus these tensors. A delta folder (written and read by :mod:`models.delta`) holds

- ``config.json``: timm's model config (as ``timm.models.save_for_hf`` writes it: ``architecture`` = the
  ``dtl_*`` entry point of a registered backbone, ``num_classes``, ``model_args`` with the DTL settings) plus a
  ``"dtl"`` block: ``format`` (``dtl-delta/1``), ``delta_file``, ``delta_sha256``, ``model_spec`` (backbone name
  and timm arguments, method and settings, normalisation, class names, and the backbone weights it was trained
  on: a file and its fingerprint, timm's published weights, or a random initialisation) and run information;
- ``delta.safetensors``: the trainable tensors, under the names of :func:`models.trainable.delta_state_dict`.

One call turns a folder -- or a ``delta.pth`` -- back into the full model, on the backbone weights it records
(timm's published ones, from the hub or ``cache_dir``) or on a local file; weights other than the recorded ones
are refused unless ``allow_backbone_mismatch=True``::

    m = models.load_delta("runs/cifar/delta", backbone_file="ViT-B_16.npz")      # a folder or runs/cifar/delta.pth
    m = models.load_delta("runs/cifar/delta")                                   # trained on timm's weights
    m = timm.create_model("local-dir:runs/cifar/delta", pretrained=True)         # the same, through timm

``train.py --delta_folder`` writes it next to ``delta.pth``; ``train.py --eval_only --checkpoint`` and
``tools/predict.py --deltas`` accept the folder wherever they accept a ``delta.pth``. Pushing the folder to a hub
is ``huggingface_hub.upload_folder``'s job.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .delta import build_from_delta, delta_from_model, read_delta, spec_of_model, write_folder
from .delta_folder import CONFIG_FILE, DELTA_FILE, DELTA_FORMAT, is_delta_folder, load_delta_tensors

__all__ = ["save_delta", "load_delta", "load_delta_tensors", "delta_folder_next_to", "is_delta_folder",
           "CONFIG_FILE", "DELTA_FILE", "DELTA_FORMAT"]


def save_delta(model: nn.Module, folder: Union[str, os.PathLike], info: Optional[Mapping[str, Any]] = None,
               class_names: Optional[Sequence[str]] = None) -> str:
    """Write ``model``'s delta folder (``config.json`` + ``delta.safetensors``, each file atomically).

    ``model`` is a DTL model on any ViT or Swin backbone (built through a ``dtl_*`` entry point or
    :func:`models.create_dtl_model`); ``info`` adds run information (dataset, top1, ...); ``class_names`` (in
    label order) are recorded for predictions."""
    if not hasattr(model, "dtl_cfg"):
        raise TypeError(f"save_delta: {type(model).__name__} is not a DTL model")
    spec = spec_of_model(model, class_names=class_names)
    return write_folder(delta_from_model(model, spec, **dict(info or {})), folder)


def delta_folder_next_to(delta_pth: str) -> str:
    """``train.py --delta_folder``: the folder of delta checkpoint ``run/delta.pth`` as ``run/delta/``."""
    return write_folder(read_delta(delta_pth), os.path.splitext(delta_pth)[0])


def load_delta(
    path: Union[str, os.PathLike],
    backbone_file: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    allow_backbone_mismatch: bool = False,
    device: Optional[Union[str, torch.device]] = None,
) -> nn.Module:
    """The full model of a delta folder or ``delta.pth`` in one call (:func:`models.delta.build_from_delta`):
    the backbone from ``backbone_file`` (``.npz``, ``.pth``, ``.safetensors``) or, when it is not given, from the
    weights the delta records (timm's published weights: hub or ``cache_dir``); then the delta."""
    return build_from_delta(read_delta(path), load_path=backbone_file, cache_dir=cache_dir,
                            allow_backbone_mismatch=allow_backbone_mismatch, device=device)
