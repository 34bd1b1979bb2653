"""Share a trained DTL model as a *delta-only* folder, the way peft shares adapters.

Only the side network and the head train (~0.1 M tensors), so a result is the backbone's timm tag plus these
tensors. A delta folder holds

- ``config.json``: timm's model config (as ``timm.models.save_for_hf`` writes it: ``architecture`` = the
  ``dtl_*`` entry point, ``num_classes``, ``model_args`` with the DTL settings, ``pretrained_cfg`` with the
  backbone's ``tag``) plus a ``"dtl"`` block: ``format`` (``dtl-delta/1``), ``delta_file``, ``backbone_weights``
  (the timm ``arch.tag`` of the backbone weights), ``model_name`` / ``model_kwargs`` (how ``train.py`` and
  :func:`models.create_dtl_model` rebuild it), ``method``, ``model_config``, ``trainable`` and run information;
- ``delta.safetensors``: the trainable tensors, under the names of :func:`models.trainable.delta_state_dict`.

One call turns it back into the full model, the backbone coming from its timm tag (hub, ``cache_dir``) or from a
local file::

    m = models.load_delta("runs/cifar/delta")                                   # backbone from the hub tag
    m = models.load_delta("runs/cifar/delta", backbone_file="ViT-B_16.npz")     # or a local .npz/.pth/.safetensors
    m = timm.create_model("local-dir:runs/cifar/delta", pretrained=True)         # the same, through timm

``train.py --delta_folder`` writes it next to ``delta.pth``; ``train.py --eval_only --checkpoint`` and
``tools/predict.py --deltas`` accept the folder wherever they accept a ``delta.pth``. Pushing the folder to a hub
is ``huggingface_hub.upload_folder``'s job.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf

from utils.atomic import atomic_write, atomic_write_text

from .config import DTL_KEYS, DTLConfig
from .delta_folder import (
    CONFIG_FILE, DELTA_FILE, DELTA_FORMAT, delta_file_sha256, is_delta_folder, load_delta_tensors, read_folder_config,
    read_folder_tensors,
)
from .factory import create_dtl_model
from .pretrained import CheckpointError
from .timm_api import backbone_tag_of
from .trainable import count_parameters, delta_state_dict

__all__ = ["save_delta", "load_delta", "read_delta_folder", "load_delta_tensors", "delta_folder_from_checkpoint",
           "delta_folder_next_to", "is_delta_folder", "CONFIG_FILE", "DELTA_FILE", "DELTA_FORMAT"]

_RUN_INFO = ("benchmark", "dataset", "shot", "seed", "top1")


def _backbone_kwargs(model: nn.Module) -> Dict[str, Any]:
    drop = set(DTL_KEYS) | {"num_classes", "global_pool", "dtl", "lean"}
    return {k: v for k, v in model.__dict__.get("_raw_model_args", {}).items() if k not in drop}


def _model_name(model: nn.Module) -> str:
    bcfg = getattr(model.backbone, "pretrained_cfg", None) or {}
    return str(bcfg.get("architecture") or model.pretrained_cfg["architecture"][len("dtl_"):])


def _timm_config(model: nn.Module) -> Dict[str, Any]:
    """timm's config.json of ``model`` (``save_for_hf``'s own writer), as a dict."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, CONFIG_FILE)
        save_config_for_hf(model, Path(path), model_args=dict(model._model_args))  # explicit: not every timm records them
        with open(path) as f:
            return json.load(f)


def _folder_config(model: nn.Module, model_name: str, model_kwargs: Mapping[str, Any],
                   info: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    arch = model.pretrained_cfg.get("architecture")
    if not arch or not timm.is_model(arch):
        raise ValueError(f"{type(model).__name__} on {model_name!r} has no registered dtl_* entry point "
                         f"(architecture {arch!r}), so a delta folder could not be loaded back")
    cfg = _timm_config(model)
    counts = count_parameters(model)
    cfg["dtl"] = {
        "format": DELTA_FORMAT,
        "delta_file": DELTA_FILE,
        "backbone_weights": backbone_tag_of(arch, model.pretrained_cfg.get("tag")),
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "method": model.dtl_cfg.method,
        "model_config": model.model_config(),
        "trainable": counts.trainable,
        **{k: v for k, v in dict(info or {}).items() if v is not None},
    }
    return cfg


def _write_folder(folder: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    os.makedirs(folder, exist_ok=True)
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(os.path.join(folder, DELTA_FILE), lambda p: save_file(flat, p, metadata={"format": DELTA_FORMAT}))
    config = {**config, "dtl": {**config["dtl"], "delta_sha256": delta_file_sha256(os.path.join(folder, DELTA_FILE))}}
    text = json.dumps(config, indent=2, default=lambda o: list(o) if isinstance(o, tuple) else str(o)) + "\n"
    atomic_write_text(os.path.join(folder, CONFIG_FILE), text)  # last: a folder with config.json is complete
    return folder


def save_delta(model: nn.Module, folder: Union[str, os.PathLike], info: Optional[Mapping[str, Any]] = None) -> str:
    """Write ``model``'s delta folder (``config.json`` + ``delta.safetensors``, each file atomically).

    ``model`` is a DTL model built through a ``dtl_*`` entry point or :func:`models.create_dtl_model`; ``info``
    adds run information (dataset, top1, ...) to the ``"dtl"`` block."""
    if not hasattr(model, "dtl_cfg"):
        raise TypeError(f"save_delta: {type(model).__name__} is not a DTL model")
    cfg = _folder_config(model, _model_name(model), _backbone_kwargs(model), info)
    return _write_folder(str(folder), cfg, delta_state_dict(model))


def delta_folder_from_checkpoint(ckpt: Mapping[str, Any], folder: Union[str, os.PathLike]) -> str:
    """Write the delta folder of a ``train.py`` delta checkpoint dict (``delta.pth``): its configuration comes
    from the model rebuilt on the meta device (no memory, no weights)."""
    mc = ckpt["model_config"]
    kwargs = dict(ckpt.get("model_kwargs") or {})
    with torch.device("meta"):
        model = create_dtl_model(ckpt["backbone"], int(mc["num_classes"]), DTLConfig.from_dict(dict(mc["dtl"])), **kwargs)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    got = {n: tuple(t.shape) for n, t in ckpt["delta"].items()}
    if expected != got:
        raise CheckpointError(f"delta checkpoint does not fit its own model configuration: expected {expected}, got {got}")
    info = {k: ckpt.get(k) for k in _RUN_INFO}
    # train.py's record of the backbone weights the delta was trained on (file name + fingerprint), so that
    # --eval_only / tools/predict.py refuse a folder on other weights as they refuse delta.pth
    info["trained_on_weights"] = ckpt.get("backbone_weights")
    cfg = _folder_config(model, str(ckpt["backbone"]), kwargs, info)
    return _write_folder(str(folder), cfg, ckpt["delta"])


def delta_folder_next_to(delta_pth: str) -> str:
    """``train.py --delta_folder``: the folder of delta checkpoint ``run/delta.pth`` as ``run/delta/``."""
    ckpt = torch.load(delta_pth, map_location="cpu", weights_only=True)
    return delta_folder_from_checkpoint(ckpt, os.path.splitext(delta_pth)[0])


def read_delta_folder(folder: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The folder as the dict ``train.py`` stores in ``delta.pth`` (``format``, ``delta``, ``model_config``,
    ``method``, ``backbone``, ``model_kwargs`` and the run information)."""
    folder = str(folder)
    block = read_folder_config(folder)["dtl"]
    out = {
        "format": DELTA_FORMAT,
        "delta": read_folder_tensors(folder, block),
        "model_config": block["model_config"],
        "method": block["method"],
        "backbone": block["model_name"],
        "model_kwargs": dict(block.get("model_kwargs") or {}),
    }
    out.update({k: block[k] for k in _RUN_INFO if k in block})
    if block.get("trained_on_weights") is not None:
        out["backbone_weights"] = block["trained_on_weights"]
    return out


def load_delta(
    folder: Union[str, os.PathLike],
    backbone_file: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    **kwargs: Any,
) -> nn.Module:
    """The full model of a delta folder in one call: ``timm.create_model("local-dir:<folder>", pretrained=True)``,
    the backbone weights from the folder's timm tag (hub, ``cache_dir``) or from ``backbone_file`` (``.npz``,
    ``.pth``, ``.safetensors``), then the delta. ``kwargs`` go to ``timm.create_model``."""
    folder = str(folder)
    read_folder_config(folder)  # a clear error before any model work
    if not is_delta_folder(folder):
        raise CheckpointError(f"{folder}: {DELTA_FILE} is missing")
    if backbone_file is not None and not os.path.isfile(backbone_file):
        raise CheckpointError(f"backbone weights not found: {backbone_file}")
    overlay = dict(file=str(backbone_file)) if backbone_file else None
    return timm.create_model("local-dir:" + os.path.abspath(folder), pretrained=True,
                             pretrained_cfg_overlay=overlay, cache_dir=cache_dir, **kwargs)
