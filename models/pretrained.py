"""Load pre-trained *backbone* weights into a DTL (or baseline) model, with a check that nothing was missed.

Formats:
- a Google ViT ``.npz`` (``ViT-B_16.npz``, ImageNet-21k): through timm's own npz loader
  (``VisionTransformer.load_pretrained``), which fills the final norm from ``Transformer/encoder_norm``;
- a PyTorch/timm checkpoint (``.pth``, ``.pt``, ``.bin``) or ``.safetensors``: a state dict, optionally under
  ``model``/``state_dict``, optionally with ``module.``/``backbone.`` prefixes; passed through the backbone
  family's timm ``checkpoint_filter_fn`` (this converts, e.g., the original Microsoft Swin release).

Every backbone parameter is first filled with NaN; a parameter still NaN after loading was not in the file,
and that is an error naming the file and the keys. Classifier heads in the file are ignored.

After loading, the backbone carries ``weights_record`` = ``{"file": <file name>, "fingerprint": "sha256:..."}``
(:func:`weights_fingerprint` of the loaded tensors, whatever the file format): delta checkpoints store it, so a
delta is not evaluated on other backbone weights by mistake (:func:`check_backbone_match`).
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import math
import os
import re
import zipfile
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file as load_safetensors

from utils.hashing import hash_tensor

from .spec import WeightsSpec

__all__ = ["load_backbone_weights", "read_state_dict", "CheckpointError", "weights_fingerprint", "weights_record",
           "weights_spec", "check_backbone_match", "BackboneMismatchError", "check_weights_file", "check_finite",
           "describe_state_dict", "describe_backbone"]

_logger = logging.getLogger(__name__)


from utils.errors import BackboneMismatchError, CheckpointError  # noqa: E402  (re-exported)


def weights_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` of the tensors (names, dtypes, shapes, bytes; in name order), the same for the same
    weights read from a ``.npz``, a ``.pth`` or a ``.safetensors`` file."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        hash_tensor(h, name, tensors[name])
    return "sha256:" + h.hexdigest()


def weights_record(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The ``weights_record`` of the backbone inside ``model`` (None: random initialisation)."""
    for m in model.modules():
        rec = getattr(m, "weights_record", None)
        if rec is not None:
            return dict(rec)
    return None


def weights_spec(record: Any, *, random_if_none: bool = False) -> Optional[WeightsSpec]:
    """A backbone-weights record as a :class:`~models.spec.WeightsSpec`.

    ``record`` is a ``WeightsSpec``, its dict (``kind``/``source``/``fingerprint``) or the older form a module's
    ``weights_record`` and delta files before model specs carry (``{"file": <name or "timm:<name>">,
    "fingerprint": ...}``). ``None`` is "not recorded" (returned as ``None``), or with ``random_if_none`` a
    randomly initialised backbone (a module without ``weights_record``)."""
    if record is None:
        return WeightsSpec("random") if random_if_none else None
    if isinstance(record, WeightsSpec):
        return record
    if "kind" in record:
        return WeightsSpec.from_dict(record)
    name = str(record.get("file") or "")
    if name.startswith("timm:"):
        return WeightsSpec("timm", name[len("timm:"):] or None, record.get("fingerprint"))
    return WeightsSpec("file", name or "(unknown file)", record.get("fingerprint"))


def check_backbone_match(saved: Any, current: Any, source: str, allow: bool, log=None) -> None:
    """The one backbone check of every delta reader: refuse a delta (``saved``: the weights it records, ``None``
    when it records none) on backbone weights (``current``; ``None``: a randomly initialised backbone) other than
    the ones it was trained on; with ``allow`` (``--allow_backbone_mismatch``) only log it. Both take a
    :class:`~models.spec.WeightsSpec` or a record (:func:`weights_spec`). ``log(msg)``: where notes go."""
    log = log or _logger.warning
    trained, given = weights_spec(saved), weights_spec(current, random_if_none=True)
    if trained is None:
        log(f"note: {source} does not record the backbone weights it was trained on (a delta written before they "
            f"were recorded): the backbone is not checked")
        return
    if trained.kind == "random" and given.kind == "random":
        log(f"note: {source} was trained on a randomly initialised backbone and is used on one: the backbone cannot "
            f"be checked")
        return
    if trained.kind != "random" and trained.fingerprint == given.fingerprint:
        return
    desc = lambda w: ("a randomly initialised backbone" if w.kind == "random" else  # noqa: E731
                      f"{w.describe()} ({(w.fingerprint or 'no fingerprint')[:19]}...)")
    was = desc(trained) if trained.kind == "random" else "backbone weights " + desc(trained)
    msg = f"{source} was trained on {was}, but the backbone given is {desc(given)}"
    if not allow:
        raise BackboneMismatchError(msg + "; give the weights it was trained on (--load_path), or pass "
                                          "--allow_backbone_mismatch to use it anyway")
    log("--allow_backbone_mismatch: " + msg)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a tensor dict from a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file, unwrapping common containers."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            sd = load_safetensors(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any read failure is a bad file for the user
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    out = {}
    for k, v in sd.items():
        for p in ("module.", "backbone."):
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def check_weights_file(path: str) -> None:
    """A cheap look at a ``--load_path`` file before anything is created: it exists, is a file, is not empty, and
    its container is whole (a ``.npz``/``.pth`` zip archive with its directory, a ``.safetensors`` header, or a
    legacy pickle). The tensors themselves are checked when they are loaded."""
    if os.path.isdir(path):
        raise CheckpointError(f"--load_path {path}: is a directory, not a weights file")
    if not os.path.isfile(path):
        raise CheckpointError(f"pretrained weights not found: {path} (check --load_path)")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"corrupt or truncated: {path} (an empty file; check --load_path)")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"--load_path {path}: cannot read it: {e.strerror}") from None
    if path.endswith(".safetensors"):
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise CheckpointError(f"corrupt or truncated: {path} (not a whole .safetensors file)")
        return
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"corrupt or truncated: {path} ({e})") from None
        return
    if path.endswith(".npz") or not head.startswith(b"\x80"):  # neither a zip archive nor a legacy pickle
        raise CheckpointError(f"corrupt or truncated: {path} (not a {'.npz' if path.endswith('.npz') else 'PyTorch'} "
                              f"archive: incomplete, or another kind of file)")


def check_finite(tensors: Mapping[str, Any], source: str) -> None:
    """Refuse weights holding NaN or inf, naming ``source`` and the first bad tensor (in file order)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: tensor {name!r} holds {kind} ({bad} of {t.numel()} values not finite): "
                                  f"the weights are corrupt (a diverged or damaged checkpoint)")


def _npz_tensors(path: str) -> Dict[str, torch.Tensor]:
    import numpy as np

    try:
        with np.load(path) as z:
            return {k: torch.from_numpy(np.asarray(z[k])) for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"cannot read {path} as a Google ViT .npz: {type(e).__name__}: {e}") from e


def _count(keys: List[str], pattern: str) -> int:
    return len({m.group(1) for m in (re.match(pattern, k) for k in keys) if m})


def describe_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    """What architecture a state dict's keys and shapes look like (for error messages): a ViT / Swin / Swin V2
    (timm or the original layout) with its sizes, a Google ViT ``.npz``, an original DTL model, a CNN, ..."""
    keys = [k[len("backbone."):] if k.startswith("backbone.") else k for k in sd]
    shape = lambda k: tuple(sd.get(k, sd.get("backbone." + k)).shape)  # noqa: E731
    if any(k.startswith("Transformer/encoderblock_") for k in keys):
        depth = _count(keys, r"Transformer/encoderblock_(\d+)/")
        emb = shape("embedding/kernel") if "embedding/kernel" in keys else None
        return (f"a Google ViT .npz (depth {depth}" + (f", patch {emb[0]}, embed dim {emb[-1]}" if emb else "") + ")")
    extra = " with the original DTL side network (lora_dict.*)" if any(k.startswith("lora_dict.") for k in keys) else ""
    emb = shape("patch_embed.proj.weight") if "patch_embed.proj.weight" in keys else None
    if any(re.match(r"layers\.\d+\.blocks\.\d+\.", k) for k in keys):
        v2 = any(k.endswith(("logit_scale", "cpb_mlp.0.weight")) for k in keys)
        depths = [_count(keys, rf"layers\.{j}\.blocks\.(\d+)\.") for j in range(_count(keys, r"layers\.(\d+)\."))]
        size = f"embed dim {emb[0]}, patch {emb[-1]}, " if emb else ""
        return f"a Swin{' V2' if v2 else ''} ({size}depths {tuple(depths)}){extra}"
    if any(re.match(r"blocks\.\d+\.", k) for k in keys):
        depth = _count(keys, r"blocks\.(\d+)\.")
        eva = any(".attn.q_proj." in k or k.endswith("attn.q_bias") or ".mlp.fc1_g." in k for k in keys)
        size = f"embed dim {emb[0]}, patch {emb[-1]}, " if emb else ""
        tokens = "class token" if "cls_token" in keys else "no class token"
        if "reg_token" in keys:
            tokens += f", {shape('reg_token')[1]} register tokens"
        return f"a {'EVA-style ' if eva else ''}ViT ({size}depth {depth}, {tokens}){extra}"
    if any(k.startswith(("layer1.", "conv1.")) for k in keys):
        return "a ResNet-style CNN"
    if any(k.startswith(("stages.", "stem.")) for k in keys):
        return "a CNN with stages (e.g. ConvNeXt)"
    return f"no known backbone layout (first keys: {', '.join(keys[:4])})"


def describe_backbone(backbone: nn.Module) -> str:
    """The backbone a run expects, in the words of :func:`describe_state_dict`."""
    name = type(backbone).__name__
    pe = getattr(getattr(backbone, "patch_embed", None), "proj", None)
    size = f"embed dim {pe.weight.shape[0]}, patch {pe.weight.shape[-1]}, " if pe is not None else ""
    if hasattr(backbone, "layers"):
        return f"a timm {name} ({size}depths {tuple(len(s.blocks) for s in backbone.layers)})"
    if hasattr(backbone, "blocks"):
        tokens = "class token" if getattr(backbone, "cls_token", None) is not None else "no class token"
        if getattr(backbone, "reg_token", None) is not None:
            tokens += f", {backbone.reg_token.shape[1]} register tokens"
        return f"a timm {name} ({size}depth {len(backbone.blocks)}, {tokens})"
    return f"a timm {name}"


def _mismatch(sd: Mapping[str, torch.Tensor], backbone: nn.Module) -> str:
    return f"the file looks like {describe_state_dict(sd)}; this run expects {describe_backbone(backbone)}"


def _filter_fn(backbone: nn.Module):
    module = importlib.import_module(type(backbone).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def in_model_layout(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> bool:
    """Whether every backbone tensor of ``state_dict`` already has a key and shape of ``model`` (a timm
    checkpoint of this architecture): such a dict needs no ``checkpoint_filter_fn``. (timm's Swin filter before
    1.0.31 takes a headless current-layout dict for the original layout and moves its patch merging.)"""
    own = model.state_dict()
    keys = [k for k in state_dict if not _head_key(k)]
    return bool(keys) and all(k in own and tuple(state_dict[k].shape) == tuple(own[k].shape) for k in keys)


def _head_key(k: str) -> bool:
    return k.startswith(("head.", "fc.", "classifier.", "pre_logits.")) or k in ("head", "fc_norm.weight", "fc_norm.bias")


def load_backbone_weights(model: nn.Module, path: str) -> int:
    """Load pre-trained weights into ``model.backbone`` (or into ``model`` itself when it is a bare timm
    backbone); return the number of backbone tensors loaded.

    Raises :class:`CheckpointError` (naming ``path``) for a missing/unreadable file or for backbone parameters
    that the file does not provide.
    """
    backbone = getattr(model, "backbone", model)
    if not os.path.isfile(path):
        raise CheckpointError(f"pretrained weights not found: {path} (check --load_path)")
    params = dict(backbone.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.fill_(math.nan)
        if path.endswith(".npz"):
            sd = _npz_tensors(path)
            check_finite(sd, path)
            if not hasattr(backbone, "load_pretrained"):
                raise CheckpointError(f"{path}: .npz weights are for ViT backbones, not {type(backbone).__name__}")
            try:
                backbone.load_pretrained(path)
            except KeyError as e:
                raise CheckpointError(f"{path}: key {e} missing from the .npz (not a Google ViT checkpoint of this "
                                      f"size?); {_mismatch(sd, backbone)}") from e
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
                raise CheckpointError(f"cannot read {path} as a Google ViT .npz: {type(e).__name__}: {e}") from e
            except RuntimeError as e:
                raise CheckpointError(f"{path} does not fit the backbone: {e}; {_mismatch(sd, backbone)}") from e
        else:
            sd = read_state_dict(path)
            check_finite(sd, path)
            raw = sd
            filt = _filter_fn(backbone)
            if filt is not None and not in_model_layout(sd, backbone):
                try:
                    sd = filt(sd, backbone)
                except Exception as e:  # noqa: BLE001
                    raise CheckpointError(f"{path}: timm's checkpoint filter failed ({type(e).__name__}: {e}): "
                                          f"{_mismatch(raw, backbone)}") from e
            own = backbone.state_dict()
            sd = {k: v for k, v in sd.items() if not (_head_key(k) and k not in own)}
            bad_shape = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                         for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
            if bad_shape:
                raise CheckpointError(f"{path}: {_mismatch(raw, backbone)} (tensors with wrong shapes: "
                                      + "; ".join(bad_shape[:3]) + (", ..." if len(bad_shape) > 3 else "") + ")")
            backbone.load_state_dict(sd, strict=False)
    missing: List[str] = [n for n, p in params.items() if torch.isnan(p).any()]
    if missing:
        shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
        raise CheckpointError(f"{path} leaves backbone tensors uninitialised: {shown}; {_mismatch(sd, backbone)}")
    backbone.weights_record = {"file": os.path.basename(path), "fingerprint": weights_fingerprint(params)}
    _logger.info("loaded %d backbone tensors from %s", len(params), path)
    return len(params)
