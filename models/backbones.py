"""Backbones: which architecture a name is (ViT or Swin), the original's names, and the bare timm backbone.

A leaf of :mod:`models` (only timm and :mod:`models.config`), so the DTL wrappers, the baselines, the factory and
the tools all dispatch through :func:`create_backbone` instead of writing the ViT/Swin branch again.

The original launchers used timm 0.5.4 names; they map to timm 1.x names here:
``vit_base_patch16_224_in21k`` -> ``vit_base_patch16_224`` (tag ``orig_in21k``: Google's ImageNet-21k
``ViT-B_16.npz``), ``swin_base_patch4_window7_224_in22k`` -> ``swin_base_patch4_window7_224`` (tag ``ms_in22k``).
Default DTL rank: ViT ``r = 2``, Swin ``r = 4`` (the paper's settings).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, Optional, Tuple

import timm
import torch.nn as nn
from timm.models import SwinTransformer, VisionTransformer

from .config import ModelSettingsError
from .pretrained import weights_fingerprint

__all__ = ["default_normalization", "ORIGINAL_VIT_NAMES", "ORIGINAL_SWIN_NAMES", "VIT_DEFAULT_RANK", "SWIN_DEFAULT_RANK", "backbone_arch",
           "default_rank", "create_vit_backbone", "create_swin_backbone", "create_backbone"]

VIT_DEFAULT_RANK = 2
SWIN_DEFAULT_RANK = 4

# Names used by the original launchers (timm 0.5.4) -> timm 1.x architecture names.
ORIGINAL_VIT_NAMES: Dict[str, str] = {
    "vit_base_patch16_224_in21k": "vit_base_patch16_224",
    "vit_large_patch16_224_in21k": "vit_large_patch16_224",
    "vit_small_patch16_224_in21k": "vit_small_patch16_224",
    "vit_tiny_patch16_224_in21k": "vit_tiny_patch16_224",
}
# ... and for Swin, timm 1.x ``architecture.tag``.
ORIGINAL_SWIN_NAMES: Dict[str, str] = {
    "swin_base_patch4_window7_224_in22k": "swin_base_patch4_window7_224.ms_in22k",
    "swin_base_patch4_window12_384_in22k": "swin_base_patch4_window12_384.ms_in22k",
    "swin_large_patch4_window7_224_in22k": "swin_large_patch4_window7_224.ms_in22k",
    "swin_large_patch4_window12_384_in22k": "swin_large_patch4_window12_384.ms_in22k",
}


def backbone_arch(model_name: str) -> str:
    """``'vit'`` or ``'swin'``: the timm module that defines ``model_name`` (tags like ``.orig_in21k`` allowed).

    The original's names (``vit_base_patch16_224_in21k``, ``swin_base_patch4_window7_224_in22k``) are accepted too.
    """
    if model_name in ORIGINAL_VIT_NAMES:
        return "vit"
    if model_name in ORIGINAL_SWIN_NAMES:
        return "swin"
    arch = model_name.split(".")[0]
    if arch.startswith("dtl_"):
        arch = arch[len("dtl_"):]
    if arch in timm.list_models(module="vision_transformer") or arch in timm.list_models(module="deit"):
        return "vit"
    if arch in timm.list_models(module="swin_transformer"):
        return "swin"
    raise ModelSettingsError(
        f"unsupported backbone {model_name!r}: use a timm ViT (vision_transformer, e.g. vit_base_patch16_224) "
        f"or Swin (swin_transformer, e.g. swin_base_patch4_window7_224) architecture name"
    )


def default_normalization(model_name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``(mean, std)`` per channel the backbone ``model_name`` is trained and evaluated with when ``--mean`` /
    ``--std`` are not given: the original recipe's 0.5 / 0.5 for every backbone."""
    return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def default_rank(arch: str) -> int:
    """The paper's CSN rank of an architecture (``'vit'``: 2, ``'swin'``: 4)."""
    return SWIN_DEFAULT_RANK if arch == "swin" else VIT_DEFAULT_RANK


def _create(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # an argument the architecture does not take (--model_kwargs)
        raise ModelSettingsError(f"cannot build {name!r} with {sorted(kwargs)}: {e}") from e


def create_vit_backbone(
    name: str = "vit_base_patch16_224",
    pretrained: bool = False,
    layer_norm_eps: Optional[float] = None,
    **kwargs: Any,
) -> VisionTransformer:
    """A timm ViT with no head and its final norm kept in ``.norm``.

    ``name`` is a timm architecture name (a ``.tag`` selects pre-trained weights with ``pretrained=True``) or
    one of the original's names (``vit_base_patch16_224_in21k``, which maps to the ImageNet-21k weights of
    Google's ``ViT-B_16.npz``, timm tag ``orig_in21k``).
    """
    if name in ORIGINAL_VIT_NAMES:
        name = ORIGINAL_VIT_NAMES[name] + (".orig_in21k" if pretrained else "")
    kwargs.update(num_classes=0, global_pool="token", fc_norm=False)
    if layer_norm_eps is not None:
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=layer_norm_eps)
    return _create(name, pretrained, kwargs)


def create_swin_backbone(
    name: str = "swin_base_patch4_window7_224",
    pretrained: bool = False,
    layer_norm_eps: Optional[float] = None,
    **kwargs: Any,
) -> SwinTransformer:
    """A timm Swin Transformer with no classifier (``num_classes=0``).

    ``name`` is a timm Swin name (a ``.tag`` selects pre-trained weights with ``pretrained=True``), one of the
    original's names (``swin_base_patch4_window7_224_in22k`` -> ``swin_base_patch4_window7_224``, with the
    ImageNet-22k weights, timm tag ``ms_in22k``, when ``pretrained=True``) or a registered ``dtl_swin_*`` name
    (its backbone).
    """
    if name in ORIGINAL_SWIN_NAMES:
        arch = ORIGINAL_SWIN_NAMES[name]
        name = arch if pretrained else arch.split(".")[0]
    elif name.startswith("dtl_swin_"):
        name = name[len("dtl_"):]
    if not name.split(".")[0].startswith("swin_"):
        raise ModelSettingsError(f"{name!r} is not a timm Swin Transformer name (e.g. swin_base_patch4_window7_224)")
    kwargs["num_classes"] = 0
    if layer_norm_eps is not None:
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=layer_norm_eps)
    model = _create(name, pretrained, kwargs)
    if not isinstance(model, SwinTransformer):
        raise ModelSettingsError(f"{name!r} is a {type(model).__name__}, not a timm SwinTransformer")
    return model


def create_backbone(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The bare backbone of ``model_name`` (ViT or Swin, see :func:`backbone_arch`)."""
    create = create_swin_backbone if backbone_arch(model_name) == "swin" else create_vit_backbone
    model = create(model_name, pretrained=pretrained, **kwargs)
    if pretrained:  # timm's published weights: recorded like a --load_path file (see models.pretrained)
        model.weights_record = {"file": f"timm:{model_name}",
                                "fingerprint": weights_fingerprint(dict(model.named_parameters()))}
    return model
