"""Reading a *delta-only* folder (``config.json`` + ``delta.safetensors``, written by :mod:`models.hub`).

The low-level half of the format, below the model classes: :mod:`models.timm_api` loads a folder's tensors when
``timm.create_model("local-dir:<folder>", pretrained=True)`` builds a DTL model, and :mod:`models.hub` (which
writes folders and rebuilds models through the factory) reads them with the same functions.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file

from utils.hashing import file_sha256

from .pretrained import CheckpointError
from .trainable import load_delta_state_dict

__all__ = ["CONFIG_FILE", "DELTA_FILE", "DELTA_FORMAT", "delta_file_sha256", "is_delta_folder", "read_folder_config",
           "read_folder_tensors", "load_delta_tensors"]

CONFIG_FILE = "config.json"
DELTA_FILE = "delta.safetensors"  # the tensors of a delta-only folder
DELTA_FORMAT = "dtl-delta/1"  # the format tag of train.py's delta.pth too


def delta_file_sha256(path: str) -> str:
    """``sha256:<hex>`` of the delta file's bytes (its checksum, recorded in ``config.json``)."""
    return "sha256:" + file_sha256(path)


def is_delta_folder(path: Union[str, os.PathLike]) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, DELTA_FILE))


def read_folder_config(folder: str) -> Dict[str, Any]:
    """The folder's ``config.json`` (timm's model config plus the ``"dtl"`` block), checked."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} (not a delta folder)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    block = cfg.get("dtl") if isinstance(cfg, dict) else None
    if not isinstance(block, dict) or block.get("format") != DELTA_FORMAT:
        raise CheckpointError(f"{path}: no 'dtl' block of format {DELTA_FORMAT} (not a DTL delta folder)")
    for key in ("model_config", "method", "model_name"):
        if key not in block:
            raise CheckpointError(f"{path}: the 'dtl' block lacks {key!r}")
    return cfg


def read_folder_tensors(folder: str, block: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors of the folder's delta file (named in its ``"dtl"`` block)."""
    path = os.path.join(folder, block.get("delta_file", DELTA_FILE))
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: {os.path.basename(path)} is missing")
    expected = block.get("delta_sha256")
    if expected is not None and delta_file_sha256(path) != expected:
        raise CheckpointError(f"corrupt or truncated: {path} (its bytes do not match the delta_sha256 recorded in "
                              f"{CONFIG_FILE}: the file was changed or damaged after it was written)")
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - any read failure is a bad file for the user
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def load_delta_tensors(model: nn.Module, folder: Union[str, os.PathLike]) -> None:
    """Load the folder's tensors into ``model`` (every trainable tensor, with its shape, and nothing else)."""
    folder = str(folder)
    block = read_folder_config(folder)["dtl"]
    try:
        load_delta_state_dict(model, read_folder_tensors(folder, block), source=os.path.join(folder, DELTA_FILE))
    except ValueError as e:
        raise CheckpointError(str(e)) from e
