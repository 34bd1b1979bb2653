"""Build a DTL model from a backbone name (the original's or any timm ViT/Swin name) and load its weights."""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch.nn as nn

from .config import DTLConfig
from .pretrained import load_backbone_weights

__all__ = ["create_dtl_model", "create_tuned_model", "backbone_arch", "METHODS"]

# --method choices of train.py: DTL (with --fusion_size > 0: DTL+) and the baseline tuning methods.
METHODS = ("dtl", "full", "linear", "bitfit", "lora", "adapter", "adaptformer", "vpt", "ssf")

_logger = logging.getLogger(__name__)


def backbone_arch(model_name: str) -> str:
    """``'vit'`` or ``'swin'``: the timm module that defines ``model_name`` (tags like ``.orig_in21k`` allowed).

    The original's names (``vit_base_patch16_224_in21k``, ``swin_base_patch4_window7_224_in22k``) are accepted too.
    """
    import timm

    from .dtl_swin import ORIGINAL_SWIN_NAMES
    from .dtl_vit import ORIGINAL_VIT_NAMES

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
    raise ValueError(
        f"unsupported backbone {model_name!r}: use a timm ViT (vision_transformer, e.g. vit_base_patch16_224) "
        f"or Swin (swin_transformer, e.g. swin_base_patch4_window7_224) architecture name"
    )


def create_dtl_model(
    model_name: str,
    num_classes: int,
    dtl: Optional[DTLConfig] = None,
    load_path: Optional[str] = None,
    pretrained: bool = False,
    lean: bool = False,
    **backbone_kwargs: Any,
) -> nn.Module:
    """DTL/DTL+ on backbone ``model_name``; ``load_path`` is a local weights file for the backbone.

    ``lean=True`` switches on lean mode (see :mod:`models.lean`).

    ``backbone_kwargs`` go to timm (``drop_path_rate``, ``img_size``, ...). ``pretrained=True`` asks timm for
    the backbone's published weights instead (needs network access or timm's cache).
    """
    arch = backbone_arch(model_name)
    if arch == "vit":
        from .dtl_vit import DTLVisionTransformer, create_vit_backbone

        backbone = create_vit_backbone(model_name, pretrained=pretrained, **backbone_kwargs)
        model = DTLVisionTransformer(backbone, num_classes, dtl, lean=lean)
    else:
        from .dtl_swin import DTLSwinTransformer, create_swin_backbone

        backbone = create_swin_backbone(model_name, pretrained=pretrained, **backbone_kwargs)
        model = DTLSwinTransformer(backbone, num_classes, dtl, lean=lean)
    model._model_args = dict(backbone_kwargs)  # timm's reconstruction arguments (config.json, delta folders)
    if load_path:
        n = load_backbone_weights(model, load_path)
        _logger.info("backbone: %d tensors loaded from %s", n, load_path)
    return model


def create_tuned_model(
    method: str,
    model_name: str,
    num_classes: int,
    dtl: Optional[DTLConfig] = None,
    load_path: Optional[str] = None,
    pretrained: bool = False,
    lean: bool = False,
    **backbone_kwargs: Any,
) -> nn.Module:
    """The model of tuning method ``method`` (``'dtl'`` or a baseline of :mod:`models.baselines`).

    ``lean=True`` (DTL only) switches on lean mode (:mod:`models.lean`).
    """
    if method == "dtl":
        return create_dtl_model(model_name, num_classes, dtl, load_path=load_path, pretrained=pretrained, lean=lean,
                                **backbone_kwargs)
    if method not in METHODS:
        raise ValueError(f"unknown --method {method!r}; choose from {', '.join(METHODS)}")
    if lean:
        raise ValueError(f"lean mode (--lean) is implemented for DTL only, not for --method {method}")
    from .baselines import create_baseline_model

    return create_baseline_model(
        method, model_name, num_classes, load_path=load_path, pretrained=pretrained, **backbone_kwargs
    )
