"""The small *delta* checkpoint and the ``last.pth`` resume checkpoint (both written atomically, with
:mod:`utils.atomic`; its helpers are re-exported here).

Delta checkpoint (``delta.pth`` / ``delta_seed<k>.pth``), a plain dict:
    ``format`` (``"dtl-delta/1"``), ``delta`` (the trainable tensors only, see :mod:`models.trainable`),
    ``model_config`` (``model.model_config()``), ``method`` (``dtl``/``dtl+``/baseline name), ``backbone``
    (``--model``), ``model_kwargs`` (everything else the model was built with, e.g. ``img_size``), ``dataset``,
    ``benchmark``, ``seed``, ``top1`` (when known).

Resume checkpoint (``last.pth``): ``format`` (``"dtl-resume/1"``), ``args``, ``seed_index``, ``epoch`` (epochs of
that seed completed), the model delta, optimizer / scheduler / scaler / EMA states, RNG states of every
rank, the per-seed bookkeeping (best validation delta, summary rows) and the results of completed seeds.
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from models.delta_folder import DELTA_FORMAT as DELTA_FOLDER_FORMAT
from models.hub import read_delta_folder
from models.pretrained import CheckpointError

from .atomic import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = [
    "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
    "DELTA_FORMAT", "RESUME_FORMAT", "make_delta_checkpoint", "read_delta_checkpoint", "read_resume_checkpoint",
    "capture_rng_state", "restore_rng_state", "CheckpointError",
]

DELTA_FORMAT = DELTA_FOLDER_FORMAT  # one format tag for delta.pth and delta folders
RESUME_FORMAT = "dtl-resume/1"


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`utils.atomic.atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# ----------------------------------------------------------------------------------------------- delta files
def make_delta_checkpoint(
    delta: Mapping[str, torch.Tensor],
    model_config: Mapping[str, Any],
    method: str,
    backbone: str,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    **info: Any,
) -> Dict[str, Any]:
    """The dict stored in a delta checkpoint (see the module docstring)."""
    return {
        "format": DELTA_FORMAT,
        "delta": dict(delta),
        "model_config": dict(model_config),
        "method": method,
        "backbone": backbone,
        "model_kwargs": dict(model_kwargs or {}),
        **info,
    }


def _load(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a bad file for the user
        raise CheckpointError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e


def _load_format(path: str, fmt: str) -> Dict[str, Any]:
    """Read ``path`` and check that it is a checkpoint of format ``fmt`` (naming the other kind when it is)."""
    delta = fmt == DELTA_FORMAT
    ckpt = _load(path, "delta checkpoint" if delta else "resume checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        other = isinstance(ckpt, dict) and ckpt.get("format") == (RESUME_FORMAT if delta else DELTA_FORMAT)
        hint = ((" (this is a resume checkpoint; pass it to --resume)" if delta else
                 " (this is a delta checkpoint; use --eval_only --checkpoint)") if other else "")
        kind = "a delta checkpoint" if delta else "a resume checkpoint (last.pth)"
        raise CheckpointError(f"{path} is not {kind} written by train.py{hint}")
    return ckpt


def read_delta_checkpoint(path: str) -> Dict[str, Any]:
    """Read and validate a delta checkpoint (``delta.pth``) or a delta folder (``config.json`` +
    ``delta.safetensors``, :mod:`models.hub`); :class:`CheckpointError` naming ``path`` otherwise."""
    ckpt = read_delta_folder(path) if os.path.isdir(path) else _load_format(path, DELTA_FORMAT)
    for key in ("delta", "model_config", "method", "backbone"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: delta checkpoint lacks {key!r}")
    if not all(isinstance(v, torch.Tensor) for v in ckpt["delta"].values()):
        raise CheckpointError(f"{path}: 'delta' must map names to tensors")
    return ckpt


def read_resume_checkpoint(path: str) -> Dict[str, Any]:
    """Read and validate a ``last.pth`` resume checkpoint."""
    return _load_format(path, RESUME_FORMAT)


# ------------------------------------------------------------------------------------------------ RNG states
def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA generator states of this process."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": _py_state_to_list(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_py_state_from_list(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _py_state_to_list(st: Any) -> List[Any]:
    version, internal, gauss = st
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def _py_state_from_list(st: List[Any]) -> Any:
    version, internal, gauss = st
    return (version, tuple(int(v) for v in internal.tolist()), gauss)
