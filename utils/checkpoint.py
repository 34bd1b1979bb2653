"""Checkpoint files: atomic writes (:mod:`utils.atomic`; its helpers are re-exported here), checksums, the
``last.pth`` resume checkpoint.

Delta checkpoints (``delta.pth``, format :data:`DELTA_FORMAT`) are described, written and read by
:mod:`models.delta`; this module gives them the same atomic write and checksum as ``last.pth``.

Resume checkpoint (``last.pth``): ``format`` (``"dtl-resume/1"``), ``args``, ``seed_index``, ``epoch`` (epochs of
that seed completed), the model delta, optimizer / scheduler / scaler / EMA states, RNG states of every
rank, the per-seed bookkeeping (best validation delta, summary rows), the results of completed seeds, the
fingerprints of the data splits (``data_fingerprint``) and ``checksum``.

``checksum`` (``sha256:<hex>``, :func:`content_checksum`) covers every tensor (names, dtypes, shapes, bytes) and
every other value of the file; it is written by :func:`save_checkpoint` and verified by the readers, which refuse
a mismatch, a truncated, empty or unreadable file as ``corrupt or truncated: <file> (<what>)``. Files written
before checksums existed load with a note.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
from typing import Any, Dict, List, Mapping

import numpy as np
import torch

from .atomic import ErrorRecordingFile, WriteError, atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text, write_error
from .errors import CheckpointError
from .hashing import hash_tensor

__all__ = [
    "WriteError", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
    "DELTA_FORMAT", "RESUME_FORMAT", "read_tagged_checkpoint", "read_resume_checkpoint",
    "capture_rng_state", "restore_rng_state", "CheckpointError", "save_checkpoint", "content_checksum",
    "verify_checksum", "non_finite_tensors", "load_torch_file",
]

_logger = logging.getLogger("train")
CHECKSUM_KEY = "checksum"

DELTA_FORMAT = "dtl-delta/1"  # delta.pth / delta_seed<k>.pth and delta folders (models/delta.py reads and writes them)
RESUME_FORMAT = "dtl-resume/1"


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`utils.atomic.atomic_write` (flushed to disk before it replaces ``path``); a
    failed write raises :class:`utils.atomic.WriteError` with the operating system's reason."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            rec = ErrorRecordingFile(f)
            try:
                torch.save(obj, rec)
            except RuntimeError as e:  # torch hides the OSError of the failed write behind its own message
                raise write_error(path, rec.error or e) from e
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


# -------------------------------------------------------------------------------------------------- checksum
def _feed(h: "hashlib._Hash", obj: Any, where: str) -> None:
    if isinstance(obj, torch.Tensor):
        hash_tensor(h, f"T{where}", obj)
    elif isinstance(obj, Mapping):
        h.update(f"D{where}|{len(obj)}\n".encode())
        for k, v in obj.items():
            _feed(h, v, f"{where}/{k!r}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{where}|{len(obj)}\n".encode())
        for i, v in enumerate(obj):
            _feed(h, v, f"{where}/{i}")
    else:
        h.update(f"V{where}|{type(obj).__name__}|{obj!r}\n".encode())


def content_checksum(ck: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of everything in ``ck`` except its ``checksum`` entry: every tensor's name, dtype, shape
    and bytes, and every other value."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in ck.items() if k != CHECKSUM_KEY}, "")
    return "sha256:" + h.hexdigest()


def save_checkpoint(ck: Dict[str, Any], path: str) -> None:
    """Write a delta / resume checkpoint atomically with its :func:`content_checksum`."""
    atomic_torch_save({**ck, CHECKSUM_KEY: content_checksum(ck)}, path)


def verify_checksum(ck: Mapping[str, Any], path: str, what: str = "checkpoint") -> bool:
    """Check the stored checksum; ``False`` (and a note) for a file written without one; a mismatch raises
    :class:`CheckpointError` ``corrupt or truncated: <path> (...)``."""
    stored = ck.get(CHECKSUM_KEY)
    if stored is None:
        _logger.info("note: %s %s has no checksum (written by an older version): its tensors are not verified",
                     what, path)
        return False
    if content_checksum(ck) != stored:
        raise CheckpointError(f"corrupt or truncated: {path} (its content does not match the checksum stored in "
                              f"it: the file was changed or damaged after it was written)")
    return True


def non_finite_tensors(tensors: Mapping[str, Any]) -> List[str]:
    """Names of the floating-point tensors in ``tensors`` that hold NaN or +-inf."""
    return [k for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def load_torch_file(path: str, what: str) -> Any:
    """``torch.load`` of a file we or the user wrote; a missing file, a folder, or a file that cannot be
    unpickled (empty, truncated, garbage) raises :class:`CheckpointError` naming it."""
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"corrupt or truncated: {path} (an empty file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a bad file for the user
        raise CheckpointError(f"corrupt or truncated: {path} (cannot read it as a {what}: {type(e).__name__}: "
                              f"{e})") from e


# ------------------------------------------------------------------------------------------- format-tagged files
def read_tagged_checkpoint(path: str, fmt: str) -> Dict[str, Any]:
    """Read ``path``, check that it is a checkpoint of format ``fmt`` (:data:`DELTA_FORMAT` or :data:`RESUME_FORMAT`;
    naming the other kind when it is one) and verify its checksum."""
    delta = fmt == DELTA_FORMAT
    what = "delta checkpoint" if delta else "resume checkpoint"
    ckpt = load_torch_file(path, what)
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        other = isinstance(ckpt, dict) and ckpt.get("format") == (RESUME_FORMAT if delta else DELTA_FORMAT)
        hint = ((" (this is a resume checkpoint; pass it to --resume)" if delta else
                 " (this is a delta checkpoint; use --eval_only --checkpoint)") if other else "")
        kind = "a delta checkpoint" if delta else "a resume checkpoint (last.pth)"
        raise CheckpointError(f"{path} is not {kind} written by train.py{hint}")
    verify_checksum(ckpt, path, what)
    return ckpt


def read_resume_checkpoint(path: str) -> Dict[str, Any]:
    """Read and validate a ``last.pth`` resume checkpoint."""
    ckpt = read_tagged_checkpoint(path, RESUME_FORMAT)
    trainer = ckpt.get("trainer")
    if isinstance(trainer, Mapping) and isinstance(trainer.get("model_delta"), Mapping):
        bad = non_finite_tensors(trainer["model_delta"])
        if bad:
            raise CheckpointError(f"{path}: non-finite values (NaN or inf) in the trained tensors {bad}")
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
