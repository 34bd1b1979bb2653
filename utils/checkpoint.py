"""Atomic file writing, the small *delta* checkpoint and the ``last.pth`` resume checkpoint.

Every file is written to a temporary name in the destination folder and moved into place with
``os.replace``, so a reader (or a run killed half-way) never sees a half-written file.

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

import json
import os
import random
import tempfile
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

__all__ = [
    "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
    "DELTA_FORMAT", "RESUME_FORMAT", "make_delta_checkpoint", "read_delta_checkpoint", "read_resume_checkpoint",
    "capture_rng_state", "restore_rng_state", "CheckpointError",
]

DELTA_FORMAT = "dtl-delta/1"
RESUME_FORMAT = "dtl-resume/1"

try:  # one exception type for every bad checkpoint in the project
    from models.pretrained import CheckpointError
except ImportError:  # pragma: no cover - models is part of this repository
    class CheckpointError(ValueError):
        """A checkpoint file that cannot be used; the message names the file."""


def _tmp_path(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: str, path: str) -> None:
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    _replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def atomic_torch_save(obj: Any, path: str) -> None:
    tmp = _tmp_path(path)
    try:
        torch.save(obj, tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    _replace(tmp, path)


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


def read_delta_checkpoint(path: str) -> Dict[str, Any]:
    """Read and validate a delta checkpoint (or a delta folder, :mod:`models.hub`); :class:`CheckpointError`
    naming ``path`` otherwise."""
    if os.path.isdir(path):
        from models.hub import read_delta_folder

        return read_delta_folder(path)
    ckpt = _load(path, "delta checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != DELTA_FORMAT:
        hint = " (this is a resume checkpoint; pass it to --resume)" if isinstance(ckpt, dict) and ckpt.get(
            "format") == RESUME_FORMAT else ""
        raise CheckpointError(f"{path} is not a delta checkpoint written by train.py{hint}")
    for key in ("delta", "model_config", "method", "backbone"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: delta checkpoint lacks {key!r}")
    if not all(isinstance(v, torch.Tensor) for v in ckpt["delta"].values()):
        raise CheckpointError(f"{path}: 'delta' must map names to tensors")
    return ckpt


def read_resume_checkpoint(path: str) -> Dict[str, Any]:
    """Read and validate a ``last.pth`` resume checkpoint."""
    ckpt = _load(path, "resume checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != RESUME_FORMAT:
        hint = " (this is a delta checkpoint; use --eval_only --checkpoint)" if isinstance(ckpt, dict) and ckpt.get(
            "format") == DELTA_FORMAT else ""
        raise CheckpointError(f"{path} is not a resume checkpoint (last.pth) written by train.py{hint}")
    return ckpt


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
