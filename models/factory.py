"""Build a DTL model from a backbone name (the original's or any timm ViT/Swin name) and load its weights."""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch.nn as nn

from .backbones import backbone_arch, create_backbone
from .baselines import BASELINE_METHODS, create_baseline_model
from .config import DTLConfig, ModelSettingsError
from .families import default_normalization, family_of_name, list_families
from .pretrained import load_backbone_weights

__all__ = ["create_dtl_model", "create_tuned_model", "backbone_arch", "METHODS", "DTL_WRAPPERS"]

# --method choices of train.py: DTL (with --fusion_size > 0: DTL+) and the baseline tuning methods.
METHODS = ("dtl", *BASELINE_METHODS)
#: The DTL wrapper of each backbone family (:func:`models.backbones.backbone_arch`; :mod:`models.families`).
DTL_WRAPPERS = {f.name: f.wrapper for f in list_families()}

_logger = logging.getLogger(__name__)


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
    family = family_of_name(model_name)  # an unsupported family is refused before anything is built
    backbone = create_backbone(model_name, pretrained=pretrained, **backbone_kwargs)
    mean, std = default_normalization(model_name)
    model = family.wrapper(backbone, num_classes, dtl, lean=lean, mean=mean, std=std)
    model._model_args = dict(backbone_kwargs)  # timm's reconstruction arguments (config.json, delta folders)
    if load_path:
        n = load_backbone_weights(model, load_path)
        _logger.info("backbone: %d tensors loaded from %s", n, load_path)
    return model


def create_tuned_model(
    method: str, model_name: str, num_classes: int, dtl: Optional[DTLConfig] = None, lean: bool = False, **kwargs: Any
) -> nn.Module:
    """The model of tuning method ``method`` (``'dtl'`` or a baseline of :mod:`models.baselines`); ``kwargs``
    are those of :func:`create_dtl_model` / :func:`~models.baselines.create_baseline_model` (``load_path``,
    ``pretrained``, timm's backbone arguments; a baseline's ``settings``). ``lean=True`` is DTL only."""
    if method == "dtl":
        return create_dtl_model(model_name, num_classes, dtl, lean=lean, **kwargs)
    if method not in METHODS:
        raise ModelSettingsError(f"unknown --method {method!r}; choose from {', '.join(METHODS)}")
    if lean:
        raise ModelSettingsError(f"lean mode (--lean) is implemented for DTL only, not for --method {method}")
    return create_baseline_model(method, model_name, num_classes, **kwargs)
