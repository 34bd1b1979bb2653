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
from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn

from .pretrained import CheckpointError
from .timm_api import DELTA_FILE, backbone_tag_of
from .trainable import count_parameters, delta_state_dict, load_delta_state_dict

__all__ = ["save_delta", "load_delta", "read_delta_folder", "load_delta_tensors", "delta_folder_from_checkpoint", "delta_folder_next_to",
           "is_delta_folder", "CONFIG_FILE", "DELTA_FILE", "DELTA_FORMAT"]

CONFIG_FILE = "config.json"
DELTA_FORMAT = "dtl-delta/1"  # the format tag of train.py's delta.pth too
_RUN_INFO = ("benchmark", "dataset", "shot", "seed", "top1")


def is_delta_folder(path: Union[str, os.PathLike]) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, DELTA_FILE))


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _backbone_kwargs(model: nn.Module) -> Dict[str, Any]:
    from .config import DTL_KEYS

    drop = set(DTL_KEYS) | {"num_classes", "global_pool", "dtl", "lean"}
    return {k: v for k, v in model.__dict__.get("_raw_model_args", {}).items() if k not in drop}


def _model_name(model: nn.Module) -> str:
    bcfg = getattr(model.backbone, "pretrained_cfg", None) or {}
    return str(bcfg.get("architecture") or model.pretrained_cfg["architecture"][len("dtl_"):])


def _timm_config(model: nn.Module) -> Dict[str, Any]:
    """timm's config.json of ``model`` (``save_for_hf``'s own writer), as a dict."""
    from timm.models._hub import save_config_for_hf

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, CONFIG_FILE)
        save_config_for_hf(model, path, model_args=dict(model._model_args))  # explicit: not every timm records them
        with open(path) as f:
            return json.load(f)


def _folder_config(model: nn.Module, model_name: str, model_kwargs: Mapping[str, Any],
                   info: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    import timm

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
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(os.path.join(folder, DELTA_FILE), lambda p: save_file(flat, p, metadata={"format": DELTA_FORMAT}))
    text = json.dumps(config, indent=2, default=lambda o: list(o) if isinstance(o, tuple) else str(o)) + "\n"

    def write_text(p: str) -> None:
        with open(p, "w") as f:
            f.write(text)

    _atomic_write(os.path.join(folder, CONFIG_FILE), write_text)  # last: a folder with config.json is complete
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
    from .config import DTLConfig
    from .factory import create_dtl_model

    mc = ckpt["model_config"]
    kwargs = dict(ckpt.get("model_kwargs") or {})
    with torch.device("meta"):
        model = create_dtl_model(ckpt["backbone"], int(mc["num_classes"]), DTLConfig.from_dict(dict(mc["dtl"])), **kwargs)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    got = {n: tuple(t.shape) for n, t in ckpt["delta"].items()}
    if expected != got:
        raise CheckpointError(f"delta checkpoint does not fit its own model configuration: expected {expected}, got {got}")
    info = {k: ckpt.get(k) for k in _RUN_INFO}
    cfg = _folder_config(model, str(ckpt["backbone"]), kwargs, info)
    return _write_folder(str(folder), cfg, ckpt["delta"])


def delta_folder_next_to(delta_pth: str) -> str:
    """``train.py --delta_folder``: the folder of delta checkpoint ``run/delta.pth`` as ``run/delta/``."""
    ckpt = torch.load(delta_pth, map_location="cpu", weights_only=True)
    return delta_folder_from_checkpoint(ckpt, os.path.splitext(delta_pth)[0])


def _read_config(folder: str) -> Dict[str, Any]:
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


def _read_tensors(folder: str, block: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = os.path.join(folder, block.get("delta_file", DELTA_FILE))
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: {os.path.basename(path)} is missing")
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - any read failure is a bad file for the user
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def read_delta_folder(folder: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The folder as the dict ``train.py`` stores in ``delta.pth`` (``format``, ``delta``, ``model_config``,
    ``method``, ``backbone``, ``model_kwargs`` and the run information)."""
    folder = str(folder)
    block = _read_config(folder)["dtl"]
    out = {
        "format": DELTA_FORMAT,
        "delta": _read_tensors(folder, block),
        "model_config": block["model_config"],
        "method": block["method"],
        "backbone": block["model_name"],
        "model_kwargs": dict(block.get("model_kwargs") or {}),
    }
    out.update({k: block[k] for k in _RUN_INFO if k in block})
    return out


def load_delta_tensors(model: nn.Module, folder: Union[str, os.PathLike]) -> None:
    """Load the folder's tensors into ``model`` (every trainable tensor, with its shape, and nothing else)."""
    folder = str(folder)
    block = _read_config(folder)["dtl"]
    try:
        load_delta_state_dict(model, _read_tensors(folder, block), source=os.path.join(folder, DELTA_FILE))
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def load_delta(
    folder: Union[str, os.PathLike],
    backbone_file: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    **kwargs: Any,
) -> nn.Module:
    """The full model of a delta folder in one call: ``timm.create_model("local-dir:<folder>", pretrained=True)``,
    the backbone weights from the folder's timm tag (hub, ``cache_dir``) or from ``backbone_file`` (``.npz``,
    ``.pth``, ``.safetensors``), then the delta. ``kwargs`` go to ``timm.create_model``."""
    import timm

    folder = str(folder)
    _read_config(folder)  # a clear error before any model work
    if not is_delta_folder(folder):
        raise CheckpointError(f"{folder}: {DELTA_FILE} is missing")
    if backbone_file is not None and not os.path.isfile(backbone_file):
        raise CheckpointError(f"backbone weights not found: {backbone_file}")
    overlay = dict(file=str(backbone_file)) if backbone_file else None
    return timm.create_model("local-dir:" + os.path.abspath(folder), pretrained=True,
                             pretrained_cfg_overlay=overlay, cache_dir=cache_dir, **kwargs)
