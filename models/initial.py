"""``train.py --initial_checkpoint``: start the trainable tensors of a model from a file.

Accepted files (recognised by their content, not their name; read by :func:`models.delta.read_delta`):

* ``delta``: a delta checkpoint written by ``train.py`` (``delta.pth``, ``delta_seed<k>.pth``);
* ``folder``: a delta folder (``config.json`` + ``delta.safetensors``);
* ``last``: a resume checkpoint (``last.pth``): only its trainable tensors are used (no optimiser, schedule,
  epoch or RNG state: a new run starts from them);
* ``state_dict``: a plain ``{name: tensor}`` dict in this project's key layout (``side.*``, ``head.*``, and for
  baselines their own trainable names), e.g. ``delta_state_dict(model)`` saved with ``torch.save``;
* ``original``: a state dict in the original DTL code's key layout (``lora_dict.<i>.lora_A/B``,
  ``lora_fusion.weight``, ``head.*``, Swin's ``layers.<i>.lora_*``), possibly with the backbone, converted by
  :func:`models.convert.convert_original_state_dict`.

Frozen tensors in the file (a whole original model) are ignored: the backbone comes from ``--load_path``.
Every trainable tensor of the model must be in the file with its shape; anything else trainable-looking in the
file (a tensor the model does not have) is an error. Both errors name the tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .convert import convert_original_state_dict
from .delta import read_delta
from .pretrained import CheckpointError
from .trainable import is_trainable

__all__ = ["InitialCheckpoint", "InitialCheckpointError", "read_initial_checkpoint", "load_initial_checkpoint",
           "check_initial_checkpoint"]


class InitialCheckpointError(CheckpointError):
    """A file that cannot start the model (unreadable, unknown layout, keys or shapes that do not fit)."""


@dataclass
class InitialCheckpoint:
    path: str
    kind: str  # delta | folder | last | state_dict | original
    tensors: Dict[str, torch.Tensor]
    sha256: str
    info: Dict[str, Any] = field(default_factory=dict)
    class_names: Optional[Tuple[str, ...]] = None  # the classes the file's head was trained on, when it names them
    spec: Any = None  # the file's ModelSpec (a delta, a delta folder, a last.pth that records one), else None

    def record(self) -> Dict[str, Any]:
        """What config/results record about the source."""
        return {"path": self.path, "kind": self.kind, "sha256": self.sha256, **self.info}


def read_initial_checkpoint(path: str) -> InitialCheckpoint:
    """Read ``path`` (:func:`models.delta.read_delta`: any form of delta, verified; cheap, no model needed);
    errors name the file."""
    if not os.path.exists(path):
        raise InitialCheckpointError(f"--initial_checkpoint {path}: file not found")
    try:
        delta = read_delta(path)
    except CheckpointError as e:
        raise InitialCheckpointError(f"--initial_checkpoint: {e}") from e
    info: Dict[str, Any] = {}
    if delta.kind == "last":
        info = {k: delta.info.get(k) for k in ("epoch", "seed_index")}
    elif delta.spec is not None:
        info = {"method": delta.spec.method, "backbone": delta.spec.backbone,
                **{k: delta.info[k] for k in ("dataset", "seed") if k in delta.info}}
        if delta.trained_on is not None:
            info["backbone_weights"] = delta.trained_on.to_dict()
    sha = delta.checksums["file"]
    return InitialCheckpoint(os.path.abspath(path), "original" if delta.layout == "original" else delta.kind,
                             dict(delta.tensors), sha[len("sha256:"):] if sha.startswith("sha256:") else sha, info,
                             tuple(delta.class_names) if delta.class_names else None, delta.spec)


def load_initial_checkpoint(model: nn.Module, init: InitialCheckpoint) -> Dict[str, int]:
    """Copy the file's trainable tensors into ``model``; returns counts (``loaded``, ``ignored_frozen``).

    ``model`` may live on the meta device (a check only: keys and shapes, nothing copied)."""
    tensors = init.tensors
    if init.kind == "original":
        try:
            tensors = convert_original_state_dict(tensors, model)
        except (ValueError, KeyError, RuntimeError) as e:
            raise InitialCheckpointError(f"--initial_checkpoint {init.path}: cannot convert the original code's "
                                         f"layout: {e}") from e
    params = dict(model.named_parameters())
    trainable = {n: p for n, p in params.items() if is_trainable(model, n)}
    # frozen tensors (the backbone of a whole model) are ignored; a trainable-looking name the model lacks is not
    ignored = [k for k in tensors if k not in trainable and not (k not in params and _would_train(model, k))]
    missing = sorted(set(trainable) - set(tensors))
    unknown = sorted(k for k in tensors if k not in params and _would_train(model, k))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(p.shape)}"
              for k, p in sorted(trainable.items()) if k in tensors and tuple(tensors[k].shape) != tuple(p.shape)]
    problems = []
    if missing:
        problems.append(f"trainable tensors missing from the file: {missing}")
    if unknown:
        problems.append(f"tensors the model does not have: {unknown}")
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes))
    if problems:
        raise InitialCheckpointError(f"--initial_checkpoint {init.path} ({init.kind}) does not fit the model: "
                                     + "; ".join(problems))
    if not any(p.is_meta for p in trainable.values()):
        with torch.no_grad():
            for k, p in trainable.items():
                p.copy_(tensors[k].to(dtype=p.dtype, device=p.device))
    return {"loaded": len(trainable), "ignored_frozen": len(ignored)}


def _would_train(model: nn.Module, name: str) -> bool:
    try:
        return is_trainable(model, name)
    except (KeyError, AttributeError, ValueError):
        return False


def check_initial_checkpoint(init: InitialCheckpoint, build_meta_model) -> None:
    """Check keys and shapes against ``build_meta_model()`` (a model on the meta device: no memory, no weights),
    so a file that does not fit fails before the run folder, the data loaders or the real model exist."""
    with torch.device("meta"):
        model = build_meta_model()
    load_initial_checkpoint(model, init)
