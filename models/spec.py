"""The typed, frozen description of a tuned model: which backbone, which weights, which method, which head.

A :class:`ModelSpec` is built once at the edge (``train.py``'s flags, a delta's record, or a Python caller) and
then only read: the factory builds the model from it, ``config.yaml`` / ``last.pth`` / ``results.json`` and every
delta store :meth:`ModelSpec.to_dict`, and ``--eval_only`` / ``tools/predict.py`` / ``models.load_delta`` rebuild
the model from the stored spec (:meth:`ModelSpec.from_dict`). Nothing mutates a spec: :func:`dataclasses.replace`
makes a new one.

:class:`WeightsSpec` says where the backbone weights came from: a file (``kind="file"``, its path and, once
loaded, the fingerprint of the tensors), timm's published weights (``kind="timm"``, the hub tag) or none
(``kind="random"``: a random initialisation, never reported as a hub tag).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from utils.errors import CheckpointError
from utils.frozen import FrozenDict, freeze, thaw

__all__ = ["ModelSpec", "WeightsSpec", "FrozenDict", "freeze", "thaw", "WEIGHT_KINDS"]

WEIGHT_KINDS = ("file", "timm", "random")


@dataclass(frozen=True)
class WeightsSpec:
    """The backbone weights a model was (or is to be) built with.

    Args:
        kind: ``"file"`` (``source`` is the path), ``"timm"`` (timm's published weights; ``source`` is the hub tag
            when known) or ``"random"`` (no weights: random initialisation).
        source: the file path or hub tag; ``None`` for ``"random"``.
        fingerprint: ``sha256:<hex>`` of the loaded backbone tensors (:func:`models.pretrained.weights_fingerprint`),
            ``None`` before loading and for ``"random"``.
    """

    kind: str = "random"
    source: Optional[str] = None
    fingerprint: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind not in WEIGHT_KINDS:
            raise ValueError(f"WeightsSpec.kind must be one of {WEIGHT_KINDS}, got {self.kind!r}")
        if self.kind == "random" and (self.source is not None or self.fingerprint is not None):
            raise ValueError("WeightsSpec(kind='random') has no source and no fingerprint")
        if self.kind == "file" and not self.source:
            raise ValueError("WeightsSpec(kind='file') needs the file path as source")

    @classmethod
    def from_load_path(cls, load_path: Optional[str]) -> "WeightsSpec":
        """``train.py --load_path``: a file path, ``'timm'``, or empty (random initialisation)."""
        if not load_path:
            return cls("random")
        if load_path == "timm":
            return cls("timm")
        return cls("file", str(load_path))

    @property
    def load_path(self) -> str:
        """The ``--load_path`` value of these weights (the inverse of :meth:`from_load_path`)."""
        return {"random": "", "timm": "timm"}.get(self.kind, str(self.source))

    def describe(self) -> str:
        """One phrase for messages: ``random initialisation``, ``timm's published weights``, ``<file>``."""
        if self.kind == "random":
            return "random initialisation"
        if self.kind == "timm":
            return "timm's published weights" + (f" ({self.source})" if self.source else "")
        return str(self.source)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "WeightsSpec":
        if d is None:
            return cls()
        return cls(**{k: d.get(k) for k in ("kind", "source", "fingerprint") if k in d})


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a tuned model (except the backbone tensors themselves).

    Args:
        backbone: the timm model name as given (``--model``; the original's names such as
            ``vit_base_patch16_224_in21k`` included).
        method: the method as results.json names it (``dtl``, ``dtl+``, ``full``, ``lora``, ...).
        num_classes: classes of the new head.
        img_size: input resolution.
        drop_path_rate: stochastic depth of the backbone.
        backbone_kwargs: further timm arguments of the backbone (``--model_kwargs``).
        method_config: the method's own settings (DTL: :meth:`models.config.DTLConfig.to_dict`; a baseline: its
            settings, e.g. LoRA's rank); empty = the method's defaults.
        weights: where the backbone weights come from (:class:`WeightsSpec`).
        mean, std: the input normalisation (per channel) the model is trained and evaluated with.
        class_names: the class names of the head, in label order, when the data gives them.
    """

    backbone: str
    method: str
    num_classes: int
    img_size: int = 224
    drop_path_rate: float = 0.0
    backbone_kwargs: Mapping[str, Any] = field(default_factory=dict)
    method_config: Mapping[str, Any] = field(default_factory=dict)
    weights: WeightsSpec = field(default_factory=WeightsSpec)
    mean: Tuple[float, ...] = (0.5, 0.5, 0.5)
    std: Tuple[float, ...] = (0.5, 0.5, 0.5)
    class_names: Optional[Tuple[str, ...]] = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalise once, here)
        set_("backbone_kwargs", freeze(dict(self.backbone_kwargs or {})))
        set_("method_config", freeze(dict(self.method_config or {})))
        set_("mean", tuple(float(v) for v in self.mean))
        set_("std", tuple(float(v) for v in self.std))
        set_("img_size", int(self.img_size))
        set_("num_classes", int(self.num_classes))
        set_("drop_path_rate", float(self.drop_path_rate))
        if self.class_names is not None:
            set_("class_names", tuple(str(c) for c in self.class_names))
            if len(self.class_names) != self.num_classes:
                raise ValueError(f"ModelSpec: {len(self.class_names)} class names for {self.num_classes} classes")
        if isinstance(self.weights, Mapping):
            set_("weights", WeightsSpec.from_dict(self.weights))
        if len(self.mean) != len(self.std):
            raise ValueError(f"ModelSpec: mean {self.mean} and std {self.std} have different lengths")

    def timm_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments timm's backbone constructor gets (``backbone_kwargs`` + drop path + size)."""
        return {**thaw(self.backbone_kwargs), "drop_path_rate": self.drop_path_rate, "img_size": self.img_size}

    def replace(self, **changes: Any) -> "ModelSpec":
        """A new spec with ``changes`` (specs are never mutated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """The plain form stored in config.yaml, last.pth, results.json and deltas."""
        out = {f.name: thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["weights"] = self.weights.to_dict()
        out["mean"], out["std"] = list(self.mean), list(self.std)
        if self.class_names is not None:
            out["class_names"] = list(self.class_names)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "model spec") -> "ModelSpec":
        """Inverse of :meth:`to_dict`; an unknown or missing key is a :class:`CheckpointError` naming ``source``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"{source}: unknown model spec keys {unknown} (known: {sorted(names)})")
        missing = [k for k in ("backbone", "method", "num_classes") if k not in d]
        if missing:
            raise CheckpointError(f"{source}: the model spec lacks {missing}")
        kw = dict(d)
        kw["weights"] = WeightsSpec.from_dict(kw.get("weights"))
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: invalid model spec: {e}") from None

    def differences(self, other: "ModelSpec") -> Dict[str, Tuple[Any, Any]]:
        """``{field: (self's value, other's value)}`` for every field that differs (plain forms)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if json.dumps(a[k], sort_keys=True) != json.dumps(b[k], sort_keys=True)}
