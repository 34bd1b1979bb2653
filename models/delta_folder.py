"""The files of a *delta-only* folder (``config.json`` + ``delta.safetensors``), below the model classes.

:mod:`models.delta` reads and writes whole deltas (folders and ``delta.pth`` alike); this module holds the
folder's file-level rules, which :mod:`models.timm_api` (``timm.create_model("local-dir:<folder>")``) needs too:

- ``config.json`` is timm's model config plus a ``"dtl"`` block of format :data:`DELTA_FORMAT`;
- the block's ``delta_file`` is a plain file name inside the folder (no ``/``, ``\\``, ``..``, absolute path,
  nor a symbolic link that leaves the folder): a folder never makes the reader open a file elsewhere;
- the block's ``delta_sha256`` is the checksum of that file; a folder without it is refused as unverifiable.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file

from utils.checkpoint import DELTA_FORMAT
from utils.hashing import file_sha256

from .pretrained import CheckpointError, check_backbone_match, weights_record, weights_spec
from .spec import WeightsSpec
from .trainable import load_delta_state_dict

__all__ = ["CONFIG_FILE", "DELTA_FILE", "DELTA_FORMAT", "delta_file_sha256", "is_delta_folder", "read_folder_config",
           "delta_file_path", "read_folder_tensors", "folder_weights", "load_delta_tensors", "weights_file_needed"]

CONFIG_FILE = "config.json"
DELTA_FILE = "delta.safetensors"  # the tensors of a delta-only folder


def delta_file_sha256(path: str) -> str:
    """``sha256:<hex>`` of the delta file's bytes (its checksum, recorded in ``config.json``)."""
    return "sha256:" + file_sha256(path)


def is_delta_folder(path: Union[str, os.PathLike]) -> bool:
    """A folder with a ``config.json`` (whether it is a valid delta folder is checked when it is read)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


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
    if "model_spec" not in block:
        for key in ("model_config", "method", "model_name"):
            if key not in block:
                raise CheckpointError(f"{path}: the 'dtl' block lacks {key!r}")
    return cfg


def delta_file_path(folder: str, block: Mapping[str, Any]) -> str:
    """The path of the folder's delta file: ``delta_file`` must name a file directly inside ``folder``."""
    name = block.get("delta_file", DELTA_FILE)
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or os.path.isabs(name) or os.path.splitdrive(name)[0]):
        raise CheckpointError(f"{folder}: {CONFIG_FILE} names delta_file {name!r}; it must be a plain file name "
                              f"inside the folder (the folder's tensors are never read from elsewhere)")
    path = os.path.join(folder, name)
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(folder):
        raise CheckpointError(f"{folder}: delta_file {name!r} is a link to {os.path.realpath(path)}, outside the "
                              f"folder; copy the file into the folder instead")
    return path


def read_folder_tensors(folder: str, block: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors of the folder's delta file (named in its ``"dtl"`` block), verified against ``delta_sha256``."""
    path = delta_file_path(folder, block)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: {os.path.basename(path)} is missing")
    expected = block.get("delta_sha256")
    if expected is None:
        raise CheckpointError(f"{folder}: {CONFIG_FILE} records no delta_sha256, so {os.path.basename(path)} cannot "
                              f"be verified; write the folder again from the model (models.save_delta) or from its "
                              f"delta.pth (models.delta.write_folder(models.delta.read_delta('delta.pth'), folder))")
    if delta_file_sha256(path) != expected:
        raise CheckpointError(f"corrupt or truncated: {path} (its bytes do not match the delta_sha256 recorded in "
                              f"{CONFIG_FILE}: the file was changed or damaged after it was written)")
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - any read failure is a bad file for the user
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def folder_weights(block: Mapping[str, Any]) -> Optional[WeightsSpec]:
    """The backbone weights a folder's delta was trained on (``None``: not recorded): its model spec's, else the
    record of folders written before model specs (``trained_on_weights``)."""
    spec = block.get("model_spec")
    if isinstance(spec, Mapping) and spec.get("weights") is not None:
        return WeightsSpec.from_dict(spec["weights"])
    return weights_spec(block.get("trained_on_weights"))


def weights_file_needed(source: str, weights: WeightsSpec) -> CheckpointError:
    """The error of a delta trained on a backbone weights *file* when no backbone weights are given: the file is
    not part of the delta, so it must be given (every reader says it the same way)."""
    return CheckpointError(f"{source} was trained on the backbone weights file {weights.source}: give it "
                           f"(load_path / backbone_file / --load_path; timm.create_model('local-dir:...'): "
                           f"pretrained_cfg_overlay=dict(file=...))")


def load_delta_tensors(model: nn.Module, folder: Union[str, os.PathLike]) -> None:
    """Load the folder's tensors into ``model`` (every trainable tensor, with its shape, and nothing else), after
    the backbone check (:func:`models.pretrained.check_backbone_match`: a delta on other weights is refused;
    ``models.load_delta(..., allow_backbone_mismatch=True)`` overrides)."""
    folder = str(folder)
    block = read_folder_config(folder)["dtl"]
    tensors = read_folder_tensors(folder, block)
    check_backbone_match(folder_weights(block), weights_record(model), folder, allow=False)
    try:
        load_delta_state_dict(model, tensors, source=os.path.join(folder, DELTA_FILE))
    except ValueError as e:
        raise CheckpointError(str(e)) from e
