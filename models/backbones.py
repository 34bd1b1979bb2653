"""Backbones: the bare timm backbone of a name, the original's names, and thin functions over the family registry.

A leaf of :mod:`models` below the wrappers (timm, :mod:`models.families`, :mod:`models.pretrained`): the DTL
wrappers, the baselines, the factory and the tools all build backbones through :func:`create_backbone`, which
asks the registry (:mod:`models.families`) which family a name is.

The original launchers used timm 0.5.4 names; they map to timm 1.x names here:
``vit_base_patch16_224_in21k`` -> ``vit_base_patch16_224`` (tag ``orig_in21k``: Google's ImageNet-21k
``ViT-B_16.npz``), ``swin_base_patch4_window7_224_in22k`` -> ``swin_base_patch4_window7_224`` (tag ``ms_in22k``).
Default DTL rank: ViT ``r = 2``, Swin ``r = 4`` (the paper's settings; :attr:`BackboneFamily.default_rank`).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, Optional

import timm
import torch.nn as nn

from .config import ModelSettingsError
from .families import default_normalization, family_of_name, get_family, timm_name
from .pretrained import CheckpointError, weights_fingerprint

__all__ = ["ORIGINAL_VIT_NAMES", "ORIGINAL_SWIN_NAMES", "VIT_DEFAULT_RANK", "SWIN_DEFAULT_RANK", "backbone_arch",
           "default_rank", "default_normalization", "create_vit_backbone", "create_swin_backbone",
           "create_eva_backbone", "create_swinv2_backbone", "create_backbone", "prepare_token_backbone",
           "prepare_hierarchical_backbone", "published_weights_error"]

VIT_DEFAULT_RANK = 2
SWIN_DEFAULT_RANK = 4

# Names used by the original launchers (timm 0.5.4) -> timm 1.x ``architecture.tag`` (the tag selects the
# weights with pretrained=True).
ORIGINAL_VIT_NAMES: Dict[str, str] = {
    "vit_base_patch16_224_in21k": "vit_base_patch16_224.orig_in21k",
    "vit_large_patch16_224_in21k": "vit_large_patch16_224.orig_in21k",
    "vit_small_patch16_224_in21k": "vit_small_patch16_224.orig_in21k",
    "vit_tiny_patch16_224_in21k": "vit_tiny_patch16_224.orig_in21k",
}
ORIGINAL_SWIN_NAMES: Dict[str, str] = {
    "swin_base_patch4_window7_224_in22k": "swin_base_patch4_window7_224.ms_in22k",
    "swin_base_patch4_window12_384_in22k": "swin_base_patch4_window12_384.ms_in22k",
    "swin_large_patch4_window7_224_in22k": "swin_large_patch4_window7_224.ms_in22k",
    "swin_large_patch4_window12_384_in22k": "swin_large_patch4_window12_384.ms_in22k",
}


def backbone_arch(model_name: str) -> str:
    """The family name (``'vit'``, ``'eva'``, ``'swin'``, ``'swinv2'``, ...) of ``model_name`` (tags like
    ``.orig_in21k`` allowed; the original's names too); an unsupported name is a ``ModelSettingsError``."""
    return family_of_name(model_name).name


def default_rank(arch: str) -> int:
    """The paper-style CSN rank of family ``arch`` (``'vit'``: 2, ``'swin'``: 4)."""
    return get_family(arch).default_rank


def published_weights_error(name: str, error: BaseException) -> CheckpointError:
    """The :class:`CheckpointError` of timm's published weights of ``name`` (``arch`` or ``arch.tag``) that could
    not be downloaded or found in the cache (``error``: the hub's or the url's failure): which weights (tag,
    hub repository or url) and what to do."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        what = f"timm's pretrained weights of {name}"
    else:
        arch = name.split(".", 1)[0]
        where = f"hub repository {cfg.hf_hub_id}" if cfg.hf_hub_id else f"url {cfg.url}" if cfg.url else "no source"
        what = (f"timm's pretrained weights {arch}.{cfg.tag} ({where})" if cfg.tag
                else f"timm's weights of {arch} ({where})")
    reason = (str(error).strip().splitlines() or [""])[0][:300].rstrip(".")
    return CheckpointError(f"cannot download or find in the Hugging Face cache {what}: {type(error).__name__}: "
                           f"{reason}; connect to the network (or point HF_HOME at a cache holding them), or give "
                           f"a local backbone weights file (.npz, .pth, .safetensors): --load_path (models.load_delta: "
                           f"backbone_file)")


def _create(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # an argument the architecture does not take (--model_kwargs)
        raise ModelSettingsError(f"cannot build {name!r} with {sorted(kwargs)}: {e}") from e
    except OSError as e:  # the hub's errors (offline, not in the cache, HTTP) and the url downloads' are OSErrors
        if not pretrained:
            raise
        raise published_weights_error(name, e) from e


def _expect(model: nn.Module, name: str, family: str) -> nn.Module:
    if not isinstance(model, get_family(family).backbone_classes):
        raise ModelSettingsError(f"{name!r} is a {type(model).__name__}, not a timm "
                                 f"{' / '.join(c.__name__ for c in get_family(family).backbone_classes)}")
    return model


def prepare_token_backbone(model: nn.Module) -> nn.Module:
    """A timm ``VisionTransformer`` / ``Eva`` without its classifier: ``num_classes=0``; an attention-pool head
    (``global_pool='map'``, SigLIP) is removed (the DTL head pools instead). The final norm stays where the
    architecture keeps it (``.norm``, or ``.fc_norm`` for models built to normalise after average pooling)."""
    model.reset_classifier(0, "avg" if getattr(model, "global_pool", None) == "map" else None)
    return model


def prepare_hierarchical_backbone(model: nn.Module) -> nn.Module:
    """A timm Swin / Swin V2 without its classifier (``num_classes=0``; the final norm stays in ``.norm``)."""
    model.reset_classifier(0)
    return model


def _norm_layer(kwargs: Dict[str, Any], layer_norm_eps: Optional[float]) -> Dict[str, Any]:
    if layer_norm_eps is not None:
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=layer_norm_eps)
    kwargs["num_classes"] = 0
    return kwargs


def create_vit_backbone(
    name: str = "vit_base_patch16_224",
    pretrained: bool = False,
    layer_norm_eps: Optional[float] = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm ViT (``VisionTransformer``: with or without class token, register tokens, DeiT, FlexiViT, DINOv2,
    SigLIP, CLIP, ...) without classifier (:func:`prepare_token_backbone`).

    ``name`` is a timm architecture name (a ``.tag`` selects pre-trained weights with ``pretrained=True``), one
    of the original's names (``vit_base_patch16_224_in21k``, which maps to the ImageNet-21k weights of Google's
    ``ViT-B_16.npz``, timm tag ``orig_in21k``) or a registered ``dtl_vit_*`` name (its backbone).
    """
    name = timm_name(name, pretrained)
    model = _expect(_create(name, pretrained, _norm_layer(kwargs, layer_norm_eps)), name, "vit")
    return prepare_token_backbone(model)


def create_eva_backbone(name: str, pretrained: bool = False, layer_norm_eps: Optional[float] = None,
                        **kwargs: Any) -> nn.Module:
    """A timm ``Eva`` (EVA-02 and the other rotary-embedding ViTs of ``timm.models.eva``) without classifier."""
    name = timm_name(name, pretrained)
    model = _expect(_create(name, pretrained, _norm_layer(kwargs, layer_norm_eps)), name, "eva")
    return prepare_token_backbone(model)


def create_swin_backbone(
    name: str = "swin_base_patch4_window7_224",
    pretrained: bool = False,
    layer_norm_eps: Optional[float] = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm Swin Transformer with no classifier (``num_classes=0``).

    ``name`` is a timm Swin name (a ``.tag`` selects pre-trained weights with ``pretrained=True``), one of the
    original's names (``swin_base_patch4_window7_224_in22k`` -> ``swin_base_patch4_window7_224``, with the
    ImageNet-22k weights, timm tag ``ms_in22k``, when ``pretrained=True``) or a registered ``dtl_swin_*`` name
    (its backbone).
    """
    name = timm_name(name, pretrained)
    if not get_family("swin").recognises(name):
        raise ModelSettingsError(f"{name!r} is not a timm Swin Transformer name (e.g. swin_base_patch4_window7_224)")
    return _expect(_create(name, pretrained, _norm_layer(kwargs, layer_norm_eps)), name, "swin")


def create_swinv2_backbone(name: str, pretrained: bool = False, layer_norm_eps: Optional[float] = None,
                           **kwargs: Any) -> nn.Module:
    """A timm ``SwinTransformerV2`` (``swinv2_*``) with no classifier (``num_classes=0``)."""
    name = timm_name(name, pretrained)
    return _expect(_create(name, pretrained, _norm_layer(kwargs, layer_norm_eps)), name, "swinv2")


def create_backbone(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The bare backbone of ``model_name`` (its family's ``create_backbone``, see :func:`backbone_arch`)."""
    model = family_of_name(model_name).create_backbone(model_name, pretrained=pretrained, **kwargs)
    if pretrained:  # timm's published weights: recorded like a --load_path file (see models.pretrained)
        model.weights_record = {"file": f"timm:{model_name}",
                                "fingerprint": weights_fingerprint(dict(model.named_parameters()))}
    return model

