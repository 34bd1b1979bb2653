"""The backbone families DTL supports: one registry, the one place a new family plugs into.

A :class:`BackboneFamily` says everything the rest of the project needs to know about one kind of timm backbone:
how to recognise it (a timm model name, the original code's names, an instance), how to build the bare backbone,
the DTL wrapper class, the paper-style defaults (rank, tap / add-back blocks, DTL+ kernel), the converter of the
original code's key layout, which baselines it supports, and which names keep the recipe's normalisation.

A wrapper module registers its family with the :func:`register_family` class decorator::

    @register_family("vit", title="ViT", backbone_classes=(VisionTransformer,),
                     timm_modules=("vision_transformer", "deit"), create_backbone=create_vit_backbone, ...)
    class DTLVisionTransformer(DTLBase): ...

This module is a leaf of :mod:`models` (timm and :mod:`utils` only): the wrappers import it, not the reverse.
Importing :mod:`models` registers the built-in families: ``vit`` (timm ``VisionTransformer``: with or without a
class token, register tokens, pre-norm, attention-pool heads, DeiT / DeiT III, FlexiViT, DINOv2, SigLIP, CLIP),
``eva`` (timm ``Eva``: EVA-02 and the other rotary-embedding ViTs), ``swin`` (``SwinTransformer``) and
``swinv2`` (``SwinTransformerV2``).

Normalisation (:func:`default_normalization`): the paper's backbone names keep the recipe's mean = std = 0.5 (the
original code normalised every backbone so); every other backbone gets the mean / std of its timm pretrained cfg.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from utils.errors import ModelSettingsError

__all__ = ["BackboneFamily", "register_family", "get_family", "list_families", "family_of_name", "family_of_model",
           "timm_name", "default_normalization", "model_normalization", "get_dtl_model", "RECIPE_MEAN",
           "RECIPE_STD"]

RECIPE_MEAN = (0.5, 0.5, 0.5)  # the original recipe normalises with mean = std = 0.5 (ViT and Swin)
RECIPE_STD = (0.5, 0.5, 0.5)

Normalization = Tuple[Tuple[float, ...], Tuple[float, ...]]
Blocks = Tuple[List[int], List[int]]


@dataclass(frozen=True)
class BackboneFamily:
    """One family of timm backbones and how DTL uses it.

    Args:
        name: the family's name (``model_config()['arch']`` of its DTL models and baselines).
        title: its name in messages (``"ViT"``, ``"Swin V2"``).
        wrapper: the DTL wrapper class (a :class:`~models.dtl_base.DTLBase`), set by :func:`register_family`.
        backbone_classes: the timm classes of its backbones (an instance is recognised with ``isinstance``).
        timm_modules: the timm modules whose registered names are of this family (``timm.list_models(module=)``).
        create_backbone: ``create_backbone(name, pretrained=False, **timm_kwargs)`` -> the bare backbone (no
            classifier, final norm kept), from a timm name or one of ``original_names``.
        prepare: ``prepare(timm_model)`` -> the same instance made a DTL backbone (its classifier removed), for
            :func:`get_dtl_model`.
        default_rank: the CSN rank when ``DTLConfig.r`` is ``None``.
        default_blocks: ``default_blocks(backbone)`` -> ``(csn_blocks, add_back_blocks)`` when the config leaves
            them ``None``.
        plus_fusion_size: the DTL+ kernel the paper used for this family (tools' "DTL+" default).
        original_names: the original code's names (timm 0.5.4) -> timm 1.x ``arch.tag``.
        recipe_names: further names that keep the recipe's mean = std = 0.5 (the paper's backbones).
        converter: ``converter(state_dict, model)`` from the original code's key layout to this project's
            (``None``: the original had no such family).
        baselines: the baseline ``--method`` names implemented for it (:mod:`models.baselines`).
    """

    name: str
    title: str
    wrapper: type
    backbone_classes: Tuple[type, ...]
    timm_modules: Tuple[str, ...]
    create_backbone: Callable[..., nn.Module]
    prepare: Callable[[nn.Module], nn.Module]
    default_rank: int
    default_blocks: Callable[[nn.Module], Blocks]
    plus_fusion_size: int = 3
    original_names: Mapping[str, str] = field(default_factory=dict)
    recipe_names: FrozenSet[str] = frozenset()
    converter: Optional[Callable[[Mapping[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]] = None
    baselines: Tuple[str, ...] = ()

    def recognises(self, model_name: str) -> bool:
        """Whether ``model_name`` (a timm name with or without tag, ``dtl_<name>`` or an original name) is of
        this family."""
        if model_name in self.original_names:
            return True
        arch = _strip(model_name)
        return any(arch in _timm_names(m) for m in self.timm_modules)

    def uses_recipe_normalization(self, model_name: str) -> bool:
        return model_name in self.original_names or model_name in self.recipe_names


_FAMILIES: Dict[str, BackboneFamily] = {}


def register_family(name: str, **fields: Any) -> Callable[[type], type]:
    """Class decorator of a DTL wrapper: register the :class:`BackboneFamily` ``name`` with ``wrapper`` = the
    class (``fields`` are the other fields); sets the class's ``arch`` to ``name``."""
    def deco(cls: type) -> type:
        if name in _FAMILIES and _FAMILIES[name].wrapper is not cls:
            raise ValueError(f"backbone family {name!r} is already registered ({_FAMILIES[name].wrapper.__name__})")
        cls.arch = name
        _FAMILIES[name] = BackboneFamily(name=name, wrapper=cls, **fields)
        return cls
    return deco


def list_families() -> List[BackboneFamily]:
    """The registered families, in registration order."""
    return list(_FAMILIES.values())


def _supported() -> str:
    return "; ".join(f"{f.name} ({', '.join(c.__name__ for c in f.backbone_classes)}; timm modules "
                     f"{', '.join(f.timm_modules)})" for f in _FAMILIES.values())


def get_family(name: str) -> BackboneFamily:
    """The registered family ``name`` (``model_config()['arch']``)."""
    if name not in _FAMILIES:
        raise ModelSettingsError(f"unknown backbone family {name!r}; registered: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


@lru_cache(maxsize=None)
def _timm_names(module: str) -> FrozenSet[str]:
    return frozenset(timm.list_models(module=module))


def _strip(model_name: str) -> str:
    arch = model_name.split(".")[0]
    return arch[len("dtl_"):] if arch.startswith("dtl_") else arch


def family_of_name(model_name: str) -> BackboneFamily:
    """The family of a timm model name (tags like ``.orig_in21k`` allowed, ``dtl_<name>`` too) or of one of the
    original code's names; anything else is refused, before anything is built, naming the supported families."""
    for fam in _FAMILIES.values():
        if fam.recognises(model_name):
            return fam
    raise ModelSettingsError(f"unsupported backbone {model_name!r}: DTL supports the timm backbone families "
                             f"{_supported()}")


def family_of_model(model: nn.Module) -> BackboneFamily:
    """The family of a timm backbone instance (the most specific registered class wins)."""
    found = [f for f in _FAMILIES.values() if isinstance(model, f.backbone_classes)]
    if not found:
        raise ModelSettingsError(f"unsupported backbone {type(model).__name__}: DTL supports the timm backbone "
                                 f"families {_supported()}")
    mro = type(model).__mro__  # the family of the most specific class wins
    return min(found, key=lambda f: min(mro.index(c) for c in f.backbone_classes if isinstance(model, c)))


def timm_name(model_name: str, pretrained: bool) -> str:
    """The timm name to build for ``model_name``: an original name maps to its timm ``arch.tag`` (the tag only
    with ``pretrained``, where it selects the weights); ``dtl_<name>`` to ``<name>``; others unchanged."""
    for fam in _FAMILIES.values():
        if model_name in fam.original_names:
            target = fam.original_names[model_name]
            return target if pretrained else target.split(".")[0]
    arch, _, tag = model_name.partition(".")
    if arch.startswith("dtl_"):
        arch = arch[len("dtl_"):]
    return f"{arch}.{tag}" if tag else arch


def default_normalization(model_name: str) -> Normalization:
    """``(mean, std)`` a model built from ``model_name`` is trained with by default.

    The paper's backbones (the original's names, e.g. ``vit_base_patch16_224_in21k``,
    ``swin_base_patch4_window7_224_in22k``, the timm weights they map to, and the paper's seven ``dtl_vit_*`` /
    ``dtl_swin_*`` entry points) keep the recipe's mean = std = 0.5; a registered ``dtl_*`` entry point reports
    its cfg's; every other backbone uses its timm pretrained cfg's mean / std (the cfg of the name's tag, else
    the architecture's default tag; timm's ImageNet statistics if it has none).
    """
    if model_name.split(".")[0].startswith("dtl_") and timm.is_model(model_name.split(".")[0]):
        cfg = timm.models.get_pretrained_cfg(model_name)  # a registered entry point: its own cfg
        return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
    if any(f.uses_recipe_normalization(model_name) for f in _FAMILIES.values()):
        return RECIPE_MEAN, RECIPE_STD
    cfg = timm.models.get_pretrained_cfg(model_name) if timm.is_model(model_name.split(".")[0]) else None
    if cfg is None:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


def model_normalization(model: nn.Module) -> Normalization:
    """:func:`default_normalization` of a timm model instance, from its ``pretrained_cfg`` (``arch.tag``)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    if not arch:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    name = f"{arch}.{tag}" if tag else arch
    if any(f.uses_recipe_normalization(name) for f in _FAMILIES.values()):
        return RECIPE_MEAN, RECIPE_STD
    if cfg.get("mean") is not None and cfg.get("std") is not None:
        return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    return default_normalization(name)


def get_dtl_model(
    model: nn.Module,
    config: Any = None,
    num_classes: Optional[int] = None,
    lean: bool = False,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> nn.Module:
    """Wrap an existing timm model instance in DTL / DTL+, as peft's ``get_peft_model`` wraps a model::

        backbone = timm.create_model("vit_base_patch16_siglip_224", pretrained=True)
        model = models.get_dtl_model(backbone, models.DTLConfig(fusion_size=3), num_classes=100)

    The instance becomes the frozen backbone (its classifier removed, so its weights are used as they are: no
    copy); ``config`` is a :class:`~models.config.DTLConfig` (``None``: the family's defaults); ``num_classes``
    the classes of the fresh head (``None``: the timm model's). ``mean`` / ``std`` (what ``pretrained_cfg`` and
    ``timm.data.resolve_data_config`` report) default to :func:`model_normalization` of the instance. A model of
    an unsupported family is refused with a :class:`ModelSettingsError` naming the supported families.
    """
    fam = family_of_model(model)
    if num_classes is None:
        num_classes = int(getattr(model, "num_classes", 0))
    if mean is None or std is None:
        mean, std = model_normalization(model)
    backbone = fam.prepare(model)
    return fam.wrapper(backbone, num_classes, config, lean=lean, mean=mean, std=std)
