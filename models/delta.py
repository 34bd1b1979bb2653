"""Deltas: the trainable tensors of a tuned model with the description needed to rebuild it, in every form.

A *delta* is what a run produces: the tensors that trained (:func:`models.trainable.delta_state_dict`: the side
network and the head for DTL), the :class:`~models.spec.ModelSpec` of the model (backbone name and timm
arguments, method and its settings, classes, normalisation, class names, and the backbone weights it was trained
on), and run information. :func:`read_delta` opens every form and returns one :class:`DeltaCheckpoint`:

- ``delta.pth`` / ``delta_seed<k>.pth`` (``train.py``; format ``dtl-delta/1``, its checksum verified);
- a delta folder (``config.json`` + ``delta.safetensors``; :mod:`models.delta_folder` for its file rules);
- ``last.pth`` (its current trainable tensors; a spec when the file records one);
- a plain state dict in this project's key layout or in the original DTL code's (converted when a model is
  given, :func:`models.convert.convert_original_state_dict`): tensors only, no spec.

:func:`build_from_delta` is the one way back to a model (``train.py --eval_only``, ``tools/predict.py``,
:func:`models.load_delta`): the spec's model through the factory, the backbone weights, the one backbone check
(:func:`check_backbone`: a delta on weights other than the ones it records is refused unless
``allow_backbone_mismatch``), the tensors. :func:`write_pth` and :func:`write_folder` write the two file forms.

A ``delta.pth`` holds ``format``, ``delta`` (the tensors), ``model_spec`` (:meth:`ModelSpec.to_dict`, whose
``weights`` says what the backbone was: a file and its fingerprint, timm's published weights, or ``random``),
the keys of files written before model specs (``model_config``, ``method``, ``backbone``, ``model_kwargs``,
``backbone_weights``), the run information (``benchmark``, ``dataset``, ``shot``, ``seed``, ``top1``,
``init_seed``) and ``checksum``. A folder's ``config.json`` holds timm's model config (``architecture`` = the
``dtl_*`` entry point where one is registered, so that ``timm.create_model("local-dir:<folder>")`` works) and a
``"dtl"`` block with the same description.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf

from methods import Method, get_method
from utils.atomic import atomic_write, atomic_write_text
from utils.checkpoint import (
    CHECKSUM_KEY, DELTA_FORMAT, RESUME_FORMAT, load_torch_file, non_finite_tensors, save_checkpoint, verify_checksum,
)
from utils.errors import BackboneMismatchError, CheckpointError, ModelSettingsError
from utils.hashing import file_sha256

from .backbones import backbone_arch
from .families import timm_name
from .config import DTLConfig, parse_blocks
from .convert import convert_original_state_dict
from .delta_folder import (
    CONFIG_FILE, DELTA_FILE, delta_file_sha256, folder_weights, read_folder_config, read_folder_tensors,
    weights_file_needed,
)
from .factory import create_tuned_model
from .pretrained import check_backbone_match, weights_record, weights_spec
from .timm_api import describe_weights_in_cfg, set_normalization
from .spec import ModelSpec, WeightsSpec, thaw
from .timm_api import DTL_MEAN, DTL_STD
from .trainable import count_parameters, delta_state_dict, load_delta_state_dict

__all__ = ["DeltaCheckpoint", "read_delta", "write_pth", "write_folder", "build_from_delta", "check_backbone",
           "check_delta_folder_supported", "apply_delta", "delta_from_model", "checkpoint_dict", "spec_of_model", "spec_from_record",
           "plain_dtl_spec", "class_names_difference", "check_backbone_architecture", "DELTA_FORMAT"]

_logger = logging.getLogger(__name__)

#: The run information a delta carries (``init_seed``: the RNG seed the model was built with, which rebuilds a
#: randomly initialised backbone exactly).
INFO_KEYS = ("benchmark", "dataset", "shot", "seed", "top1", "init_seed")

# keys only the original code writes
_ORIGINAL_KEY = re.compile(r"^(layers\.\d+\.)?lora_(dict|fusion|fusions)\.")
# this project's DTL tensors: ViT side.taps.<block>.lora_A, Swin side.<stage>.taps.<block>.lora_A
_PLAIN_TAP = re.compile(r"^side\.(?:(\d+)\.)?taps\.(\d+)\.lora_A$")
_PLAIN_FUSION = re.compile(r"^side\.(?:\d+\.)?fusion\.conv\.weight$")

check_backbone = check_backbone_match  # the one backbone check (models.pretrained, below the model classes)


@dataclass(frozen=True)
class DeltaCheckpoint:
    """A delta read from (or to be written to) any of its forms.

    Args:
        spec: the model (:class:`ModelSpec`); ``None`` for a plain state dict (tensors only: it can start a model
            that is described elsewhere, ``--initial_checkpoint``, but not rebuild one).
        tensors: the trainable tensors, by name (``layout``'s names).
        trained_on: the backbone weights the tensors were trained on (``spec.weights`` when a spec records them);
            ``None`` when the file records none (written before they were recorded, or a plain state dict).
        model_config: the model's own ``model_config()`` as stored (checked against the rebuilt model).
        info: run information (:data:`INFO_KEYS`; ``last.pth``: ``epoch``, ``seed_index``).
        source: the path it was read from; kind: ``delta`` (``delta.pth``), ``folder``, ``last``, ``state_dict``
            or ``original``; layout: ``model`` (this project's tensor names) or ``original`` (the original code's).
        checksums: ``file`` (SHA-256 of the file read; a folder: of its delta file) and ``content`` (the checksum
            stored in a ``train.py`` file, verified on reading).
    """

    spec: Optional[ModelSpec]
    tensors: Mapping[str, torch.Tensor]
    trained_on: Optional[WeightsSpec] = None
    model_config: Optional[Mapping[str, Any]] = None
    info: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    kind: str = "delta"
    layout: str = "model"
    checksums: Mapping[str, str] = field(default_factory=dict)

    @property
    def class_names(self):
        return self.spec.class_names if self.spec is not None else None

    @property
    def name(self) -> str:
        """A short name for the task: its dataset, else the file name."""
        return str(self.info.get("dataset") or os.path.splitext(os.path.basename(os.path.normpath(self.source)))[0])

    @property
    def is_dtl(self) -> bool:
        """Whether the delta is of a method with DTL's side network (DTL, DTL+)."""
        return self.spec is not None and _method(self.spec.method, self.source).supports("uses_dtl_flags")

    def dtl_config(self) -> DTLConfig:
        if not self.is_dtl:
            raise CheckpointError(f"{self.source}: method {self.spec.method if self.spec else None!r} is not DTL")
        return DTLConfig.from_dict(thaw(self.spec.method_config))


# ------------------------------------------------------------------------------------------------------ specs
def _method(name: str, source: str) -> Method:
    """The registered method ``name`` (:mod:`methods`); an unknown one is a :class:`CheckpointError`."""
    try:
        return get_method(name)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def spec_from_record(backbone: str, method: str, model_config: Mapping[str, Any],
                     model_kwargs: Optional[Mapping[str, Any]] = None, weights: Optional[WeightsSpec] = None,
                     class_names=None, source: str = "model") -> ModelSpec:
    """The spec from the description files before model specs stored (and ``train.py`` still has at hand):
    ``backbone`` (``--model``), ``method``, the model's ``model_config()`` and its timm ``model_kwargs``."""
    mc, kwargs = dict(model_config), dict(model_kwargs or {})
    if "num_classes" not in mc:
        raise CheckpointError(f"{source}: the model configuration lacks 'num_classes'")
    entry = _method(method, source)
    if entry.supports("uses_dtl_flags") and "dtl" not in mc:
        raise CheckpointError(f"{source}: a {method} delta whose model configuration lacks 'dtl'")
    try:
        return ModelSpec(
            backbone=str(backbone), method=str(method), num_classes=int(mc["num_classes"]),
            img_size=int(kwargs.pop("img_size", 224)), drop_path_rate=float(kwargs.pop("drop_path_rate", 0.0)),
            backbone_kwargs=kwargs, method_config=entry.config_from_model(mc),
            weights=weights or WeightsSpec(), class_names=class_names)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid model description: {e}") from None


def _spec_from_old_keys(ck: Mapping[str, Any], trained_on: Optional[WeightsSpec], source: str) -> ModelSpec:
    for key in ("model_config", "method", "backbone"):
        if key not in ck:
            raise CheckpointError(f"{source}: delta checkpoint lacks {key!r}")
    return spec_from_record(ck["backbone"], ck["method"], ck["model_config"], ck.get("model_kwargs"), trained_on,
                            ck.get("class_names"), source)


def spec_of_model(model: nn.Module, method: Optional[str] = None, backbone: Optional[str] = None,
                  class_names=None) -> ModelSpec:
    """The spec of a built DTL model (its backbone's timm name and arguments, DTL settings, normalisation and the
    weights its backbone records); ``backbone`` overrides the name (``train.py``'s ``--model`` as given)."""
    if not hasattr(model, "dtl_cfg"):
        raise TypeError(f"{type(model).__name__} is not a DTL model; give its ModelSpec")
    kwargs = model.backbone_kwargs()
    size = getattr(model.backbone.patch_embed, "img_size", None) or (224, 224)
    bcfg = getattr(model.backbone, "pretrained_cfg", None) or {}
    name = backbone or str(bcfg.get("architecture") or model.pretrained_cfg["architecture"][len("dtl_"):])
    cfg = model.pretrained_cfg
    return ModelSpec(
        backbone=name, method=method or model.dtl_cfg.method, num_classes=model.num_classes,
        img_size=int(kwargs.pop("img_size", size[0])), drop_path_rate=float(kwargs.pop("drop_path_rate", 0.0)),
        backbone_kwargs=kwargs, method_config=model.dtl_cfg.to_dict(),
        weights=weights_spec(weights_record(model), random_if_none=True),
        mean=tuple(cfg.get("mean", DTL_MEAN)), std=tuple(cfg.get("std", DTL_STD)), class_names=class_names)


def plain_dtl_spec(delta: DeltaCheckpoint, backbone: str, add_back_blocks: str, beta: float = 100.0,
                   **spec_fields: Any) -> DeltaCheckpoint:
    """A plain state dict of DTL tensors (no description) with a spec: rank, taps, fusion size and class count
    from the tensors, the add-back blocks (which no tensor shows) and ``beta`` from the caller; ``spec_fields``
    are further :class:`ModelSpec` fields (``img_size``, ``backbone_kwargs``, ...)."""
    sd, path = delta.tensors, delta.source
    if "head.weight" not in sd:
        raise CheckpointError(f"{path}: a plain tensor dict must hold head.weight (the classifier)")
    matches = [m for m in (_PLAIN_TAP.match(k) for k in sd) if m]
    if not matches:
        raise CheckpointError(f"{path}: no side.taps.<i>.lora_A (ViT) or side.<stage>.taps.<i>.lora_A (Swin) "
                              "tensors: not a DTL delta")
    staged = {m.group(1) is not None for m in matches}
    if len(staged) > 1:
        raise CheckpointError(f"{path}: mixes ViT (side.taps.*) and Swin (side.<stage>.taps.*) tap names")
    fusions = [k for k in sd if _PLAIN_FUSION.match(k)]
    cfg = DTLConfig(r=int(sd[matches[0].group(0)].shape[0]), beta=beta,
                    fusion_size=int(sd[fusions[0]].shape[-1]) if fusions else 0,
                    csn_blocks=sorted(int(m.group(2)) for m in matches), add_back_blocks=parse_blocks(add_back_blocks))
    spec = ModelSpec(backbone=backbone, method=cfg.method, num_classes=int(sd["head.weight"].shape[0]),
                     method_config=cfg.to_dict(), **spec_fields)
    with torch.device("meta"):  # the tensor names must be those of a DTL model on this backbone (no weights built)
        names = {n for n, _ in _create(spec, None, False).named_parameters()}
    foreign = sorted(set(sd) - names)
    if foreign:
        raise CheckpointError(f"{path}: tensors such as {foreign[0]} are not those of a DTL model on {backbone} "
                              f"(a {backbone_arch(backbone)} backbone): a delta of another backbone family?")
    return replace(delta, spec=spec)


def _family(name: str) -> str:
    try:
        return backbone_arch(name)
    except ModelSettingsError:
        return "unknown"


def _plain(value: Any) -> Any:
    """``value`` (frozen mappings, tuples) as plain JSON data, so that equal settings compare equal."""
    return json.loads(json.dumps(thaw(value), default=list, sort_keys=True))


def check_backbone_architecture(recorded: Optional[ModelSpec], given: ModelSpec, source: str, allow: bool,
                                log: Optional[Callable[[str], None]] = None) -> None:
    """The backbone architecture a delta records (``recorded``: its timm name, so its family, and the timm
    arguments) against the one a model is built with (``given``): a delta of another architecture (say EVA-02
    tensors put into a ViT of the same width and depth, which the tensor shapes and, for a randomly initialised
    backbone, the weights fingerprint cannot tell) is refused (:class:`~utils.errors.BackboneMismatchError`)
    unless ``allow`` (``--allow_backbone_mismatch``: logged). Timm arguments are compared where both record one.
    ``recorded`` ``None`` (tensors without a description): nothing to compare."""
    if recorded is None:
        return
    def arch(name: str) -> str:  # tags and the original's names aside
        return timm_name(name, False).split(".", 1)[0]

    problems = []
    if arch(recorded.backbone) != arch(given.backbone):
        problems.append(f"it was trained on a {recorded.backbone} backbone (family {_family(recorded.backbone)}), "
                        f"this model is a {given.backbone} (family {_family(given.backbone)})")
    ka, kb = _plain(dict(recorded.backbone_kwargs)), _plain(dict(given.backbone_kwargs))
    differ = [f"{k}={ka[k]!r} vs {kb[k]!r}" for k in sorted(set(ka) & set(kb)) if ka[k] != kb[k]]
    if differ:
        problems.append("its backbone's timm arguments differ (the delta's vs this model's: " + ", ".join(differ) + ")")
    if not problems:
        return
    msg = f"{source}: " + "; ".join(problems)
    if not allow:
        raise BackboneMismatchError(msg + "; use a delta of this backbone, or pass --allow_backbone_mismatch to use "
                                          "it anyway")
    (log or _logger.warning)("--allow_backbone_mismatch: " + msg)


def _few(names, n: int = 5) -> str:
    names = list(names)
    return ", ".join(repr(x) for x in names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def class_names_difference(recorded, given) -> Optional[str]:
    """How the class names a delta records (``recorded``, in label order) differ from the data's (``given``):
    ``None`` when they are the same or either side names none; otherwise one phrase saying whether they are
    other names or the same names in another order, with a few examples."""
    if not recorded or not given:
        return None
    recorded, given = [str(x) for x in recorded], [str(x) for x in given]
    if recorded == given:
        return None
    if sorted(recorded) == sorted(given):
        moved = [f"label {i} is {a!r} in the delta but {b!r} in the data"
                 for i, (a, b) in enumerate(zip(recorded, given)) if a != b]
        return (f"the same class names in another order ({'; '.join(moved[:3])}"
                + (f"; {len(moved) - 3} more" if len(moved) > 3 else "") + ")")
    in_delta, in_data = set(recorded), set(given)
    only_delta = [x for x in recorded if x not in in_data]
    only_data = [x for x in given if x not in in_delta]
    parts = [f"the delta's {_few(only_delta)} not in the data" if only_delta else "",
             f"the data's {_few(only_data)} not in the delta" if only_data else ""]
    return "other class names (" + "; ".join(p for p in parts if p) + ")"


# ---------------------------------------------------------------------------------------------------- reading
def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _stored_spec(d: Any, source: str) -> Optional[ModelSpec]:
    return ModelSpec.from_dict(d, source) if isinstance(d, Mapping) else None


def _read_folder(folder: str) -> DeltaCheckpoint:
    block = read_folder_config(folder)["dtl"]
    tensors = read_folder_tensors(folder, block)
    trained_on = folder_weights(block)
    spec = _stored_spec(block.get("model_spec"), folder)
    if spec is None:  # a folder written before model specs
        spec = _spec_from_old_keys({"backbone": block["model_name"], **block}, trained_on, folder)
    return DeltaCheckpoint(spec, tensors, trained_on, block.get("model_config"),
                           {k: block[k] for k in INFO_KEYS if block.get(k) is not None}, folder, "folder",
                           checksums={"file": block["delta_sha256"]})


def _read_train_delta(path: str, ck: Mapping[str, Any]) -> DeltaCheckpoint:
    if not _tensor_dict(ck.get("delta")):
        raise CheckpointError(f"{path}: 'delta' must map names to tensors")
    spec = _stored_spec(ck.get("model_spec"), path)
    trained_on = spec.weights if spec is not None else weights_spec(ck.get("backbone_weights"))
    if spec is None:
        spec = _spec_from_old_keys(ck, trained_on, path)
    return DeltaCheckpoint(spec, dict(ck["delta"]), trained_on, ck.get("model_config"),
                           {k: ck[k] for k in INFO_KEYS if ck.get(k) is not None}, path, "delta")


def _read_last(path: str, ck: Mapping[str, Any]) -> DeltaCheckpoint:
    trainer = ck.get("trainer")
    if not isinstance(trainer, Mapping):
        folder = os.path.dirname(os.path.abspath(path))
        deltas = sorted(n for n in os.listdir(folder) if re.fullmatch(r"delta(_seed\d+)?\.pth", n))
        use = (", ".join(os.path.join(folder, n) for n in deltas[:4]) + (", ..." if len(deltas) > 4 else "")
               if deltas else "the finished seed's delta (delta.pth, or delta_seed<k>.pth of a run of several seeds)")
        raise CheckpointError(f"{path}: this last.pth was written after a seed finished (between seeds, or at the "
                              f"end of the run) and holds no trainable tensors; use {use} instead")
    spec = _stored_spec(ck.get("model_spec"), path)
    return DeltaCheckpoint(spec, dict(trainer.get("model_delta") or {}), spec.weights if spec else None, None,
                           {"epoch": ck.get("epoch"), "seed_index": ck.get("seed_index")}, path, "last")


def read_delta(path: Union[str, os.PathLike]) -> DeltaCheckpoint:
    """Read any form of delta (see the module docstring), verified: the file's checksum (``train.py`` files; one
    written before checksums existed loads with a note), a folder's ``delta_sha256`` and ``delta_file``, tensors
    that are all finite. :class:`CheckpointError` naming ``path`` otherwise."""
    path = str(path)
    if os.path.isdir(path):
        delta = _read_folder(path)
    else:
        obj = load_torch_file(path, "delta checkpoint")
        fmt = obj.get("format") if isinstance(obj, Mapping) else None
        if fmt in (DELTA_FORMAT, RESUME_FORMAT):
            verify_checksum(obj, path, "delta checkpoint" if fmt == DELTA_FORMAT else "resume checkpoint")
            delta = _read_train_delta(path, obj) if fmt == DELTA_FORMAT else _read_last(path, obj)
            delta = replace(delta, checksums={k: v for k, v in (("content", obj.get(CHECKSUM_KEY)),) if v})
        else:
            for key in ("state_dict", "model"):  # the usual {'state_dict': ...} wrappers
                if isinstance(obj, Mapping) and _tensor_dict(obj.get(key)):
                    obj = obj[key]
                    break
            if not _tensor_dict(obj):
                raise CheckpointError(f"{path}: not a delta, a last.pth or a state dict of tensors (name -> tensor)")
            original = any(_ORIGINAL_KEY.search(k) for k in obj)
            delta = DeltaCheckpoint(None, dict(obj), source=path, kind="original" if original else "state_dict",
                                    layout="original" if original else "model")
        delta = replace(delta, checksums={**delta.checksums, "file": "sha256:" + file_sha256(path)})
    if not _tensor_dict(delta.tensors):
        raise CheckpointError(f"{path}: holds no trainable tensors")
    bad = non_finite_tensors(delta.tensors)
    if bad:
        raise CheckpointError(f"{path}: non-finite values (NaN or inf) in the delta's tensors {bad}; a model with "
                              f"them cannot give a meaningful result")
    return delta


# ---------------------------------------------------------------------------------------------------- writing
def delta_from_model(model: nn.Module, spec: Optional[ModelSpec] = None, tensors=None, **info: Any) -> DeltaCheckpoint:
    """The delta of a built model: ``tensors`` (default: its trainable tensors now), its ``model_config()``, and
    ``spec`` (default :func:`spec_of_model`) whose ``weights`` become what the model's backbone records."""
    trained_on = weights_spec(weights_record(model), random_if_none=True)
    spec = (spec or spec_of_model(model)).replace(weights=trained_on)
    tensors = delta_state_dict(model) if tensors is None else tensors
    return DeltaCheckpoint(spec, dict(tensors), trained_on, model.model_config(),
                           {k: v for k, v in info.items() if v is not None})


def _legacy_record(w: Optional[WeightsSpec]) -> Optional[Dict[str, Any]]:
    """``backbone_weights`` as files before model specs stored it (None: a random backbone)."""
    if w is None or w.kind == "random":
        return None
    return {"file": w.source if w.kind == "file" else f"timm:{w.source or ''}", "fingerprint": w.fingerprint}


def _description(delta: DeltaCheckpoint) -> Dict[str, Any]:
    spec = delta.spec
    if spec is None:
        raise CheckpointError(f"{delta.source or 'delta'}: tensors without a model spec cannot be written as a delta")
    if delta.model_config is None:
        raise CheckpointError(f"{delta.source or 'delta'}: no model configuration to write (make it with "
                              f"delta_from_model)")
    kwargs = {**thaw(spec.backbone_kwargs), "drop_path_rate": spec.drop_path_rate, "img_size": spec.img_size}
    return {"model_spec": spec.to_dict(), "model_config": thaw(dict(delta.model_config)), "method": spec.method,
            "backbone": spec.backbone, "model_kwargs": kwargs, **dict(delta.info)}


def checkpoint_dict(delta: DeltaCheckpoint) -> Dict[str, Any]:
    """The dict a ``delta.pth`` holds (:func:`utils.checkpoint.save_checkpoint` adds its checksum)."""
    return {"format": DELTA_FORMAT, "delta": dict(delta.tensors), **_description(delta),
            "backbone_weights": _legacy_record(delta.trained_on)}


def write_pth(delta: DeltaCheckpoint, path: Union[str, os.PathLike]) -> str:
    """Write ``delta`` as a ``delta.pth`` (atomically, with its checksum); returns the path."""
    save_checkpoint(checkpoint_dict(delta), str(path))
    return str(path)


def check_delta_folder_supported(spec: ModelSpec) -> None:
    """Whether a delta folder can be written for (and read back into) ``spec``'s model: a DTL method on a ViT or
    Swin backbone with JSON-writable settings. ``train.py --delta_folder`` calls it before training; raises
    :class:`~utils.errors.ModelSettingsError` saying why not."""
    if not _method(spec.method, "model spec").supports("delta_folder"):
        raise ModelSettingsError(f"a delta folder holds a DTL/DTL+ delta; --method {spec.method} writes delta.pth only")
    backbone_arch(spec.backbone)  # a ViT or Swin name (ModelSettingsError otherwise)
    try:
        json.dumps(spec.to_dict(), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ModelSettingsError(f"the model settings of {spec.backbone} cannot be written to config.json: {e}") from None


def _timm_config(spec: ModelSpec) -> Tuple[Dict[str, Any], Dict[str, Tuple[int, ...]]]:
    """timm's config.json of the spec's model (``save_for_hf``'s own writer; ``architecture`` is its ``dtl_*``
    entry point, when one is registered) and the shapes of its trainable tensors, from the model built on the
    meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = _create(spec, None, pretrained=False)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, CONFIG_FILE)
        save_config_for_hf(model, Path(out), model_args=dict(model._model_args))
        with open(out) as f:
            cfg = json.load(f)
    cfg["pretrained_cfg"]["mean"], cfg["pretrained_cfg"]["std"] = list(spec.mean), list(spec.std)
    describe_weights_in_cfg(cfg["pretrained_cfg"], spec.weights, spec.backbone)  # the delta's, not the default tag's
    expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    return cfg, expected


def write_folder(delta: DeltaCheckpoint, folder: Union[str, os.PathLike]) -> str:
    """Write ``delta`` as a delta folder (``delta.safetensors``, then ``config.json``: a folder with a
    ``config.json`` is complete); returns the folder."""
    folder = str(folder)
    check_delta_folder_supported(delta.spec)
    cfg, expected = _timm_config(delta.spec)
    got = {n: tuple(t.shape) for n, t in delta.tensors.items()}
    if expected != got:
        raise CheckpointError(f"{delta.source or 'delta'}: its tensors do not fit its own model: expected "
                              f"{expected}, got {got}")
    desc = _description(delta)
    cfg["dtl"] = {"format": DELTA_FORMAT, "delta_file": DELTA_FILE, "model_spec": desc.pop("model_spec"),
                  "model_name": desc.pop("backbone"), **desc,
                  "trained_on_weights": _legacy_record(delta.trained_on),
                  "trainable": sum(t.numel() for t in delta.tensors.values())}
    os.makedirs(folder, exist_ok=True)
    flat = {k: v.detach().cpu().contiguous() for k, v in delta.tensors.items()}
    target = os.path.join(folder, DELTA_FILE)
    atomic_write(target, lambda p: save_file(flat, p, metadata={"format": DELTA_FORMAT}))
    cfg["dtl"]["delta_sha256"] = delta_file_sha256(target)
    atomic_write_text(os.path.join(folder, CONFIG_FILE), json.dumps(cfg, indent=2) + "\n")
    return folder


# --------------------------------------------------------------------------------------------------- building
def _create(spec: ModelSpec, load_path: Optional[str], pretrained: bool, **extra: Any) -> nn.Module:
    method = _method(spec.method, "model spec")
    name = spec.backbone
    if pretrained and spec.weights.kind == "timm" and spec.weights.source:
        name = spec.weights.source  # the published weights it was trained on (a timm "arch.tag")
    model = create_tuned_model(method.name, name, spec.num_classes, settings=thaw(spec.method_config),
                               load_path=load_path, pretrained=pretrained, **spec.timm_kwargs(), **extra)
    set_normalization(model, spec.mean, spec.std)
    return model


def _same_config(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return _plain(dict(a)) == _plain(dict(b))


def build_from_delta(
    delta: DeltaCheckpoint,
    *,
    load_path: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    allow_backbone_mismatch: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> nn.Module:
    """The model of ``delta`` with its tensors loaded, in eval mode.

    Args:
        load_path: the backbone weights: a file (``.npz``, ``.pth``, ``.safetensors``), ``"timm"`` (timm's
            published weights of the backbone name), ``""`` (random initialisation: built with the delta's
            ``init_seed`` when it records one, so that a delta trained on a random backbone gets that backbone
            again), or ``None``: the weights the delta records (timm's published ones, or a random backbone;
            a file it was trained on must be given).
        cache_dir: timm's download cache for published weights.
        allow_backbone_mismatch: use weights other than the ones the delta records (logged) instead of refusing
            them (:class:`~utils.errors.BackboneMismatchError`).
        device: where the model goes (default: CPU).
        log: where notes go (default: this module's logger, as warnings).
    """
    spec, source = delta.spec, delta.source or "delta"
    if spec is None:
        raise CheckpointError(f"{source} is a {delta.kind} without a model description: it can start a model "
                              f"(--initial_checkpoint) but not rebuild one")
    recorded = delta.trained_on
    if load_path is None:
        if recorded is not None and recorded.kind == "file":
            raise weights_file_needed(source, recorded)
        load_path = "timm" if recorded is not None and recorded.kind == "timm" else ""
    pretrained = load_path == "timm"
    extra = {"cache_dir": str(cache_dir)} if pretrained and cache_dir else {}
    seed = delta.info.get("init_seed")
    with torch.random.fork_rng(devices=[]):
        if not load_path and seed is not None:
            torch.manual_seed(int(seed))
        try:
            model = _create(spec, None if pretrained else load_path or None, pretrained, **extra)
        except ModelSettingsError as e:
            raise CheckpointError(f"{source}: cannot rebuild its model: {e}") from e
    apply_delta(model, delta, allow_backbone_mismatch=allow_backbone_mismatch, log=log)
    return model.to(device or "cpu").eval()


def apply_delta(model: nn.Module, delta: DeltaCheckpoint, *, allow_backbone_mismatch: bool = False,
                log: Optional[Callable[[str], None]] = None) -> nn.Module:
    """Load ``delta``'s tensors into ``model`` (built from its spec, backbone weights loaded): the stored model
    configuration must be the model's, the backbone the one the delta records (:func:`check_backbone`), every
    trainable tensor present with its shape (an original-layout file converted first)."""
    source = delta.source or "delta"
    if delta.model_config is not None and not _same_config(model.model_config(), delta.model_config):
        raise CheckpointError(f"{source}: stored model configuration {thaw(dict(delta.model_config))} does not match "
                              f"the rebuilt model {model.model_config()}")
    check_backbone(delta.trained_on, weights_record(model), source, allow_backbone_mismatch, log=log)
    tensors = delta.tensors
    if delta.layout == "original":
        tensors = convert_original_state_dict(tensors, model)
    try:
        load_delta_state_dict(model, tensors, source=source)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    _logger.info("%s: %s delta loaded (%d trainable values)", source, delta.spec.method if delta.spec else delta.kind,
                 count_parameters(model).trainable)
    return model
