"""Build a tuned model from a backbone name (the original's or any supported timm family) and load its weights."""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models._pretrained import PretrainedCfg

from methods import get_method, method_names

from .backbones import backbone_arch, create_backbone
from .config import DTLConfig, ModelSettingsError
from .families import default_normalization, family_of_name, list_families
from .pretrained import load_backbone_weights
from .timm_api import DTL_MEAN, DTL_STD, GENERIC_ENTRY, create_dtl_variant

__all__ = ["create_dtl_model", "create_tuned_model", "build_dtl", "dtl_side_network_reaches_head", "backbone_arch",
           "METHODS", "DTL_WRAPPERS", "dtl_timm"]

# --method choices of train.py: the registered methods (DTL, with --fusion_size > 0 DTL+, and the baselines).
METHODS = method_names()
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


def build_dtl(method: str, model_name: str, num_classes: int, config: DTLConfig, lean: bool = False,
              **kwargs: Any) -> nn.Module:
    """DTL's builder in the method registry (:mod:`methods.builtin`): :func:`create_dtl_model`."""
    return create_dtl_model(model_name, num_classes, config, lean=lean, **kwargs)


def dtl_side_network_reaches_head(model: nn.Module) -> Optional[str]:
    """DTL's check of a built model: a block selection in which no tap comes at or before an add-back block
    trains the head alone (a message), ``None`` when the side network is wired."""
    if any(n.endswith("lora_A") and ".taps." in f".{n}" for n, _ in model.named_parameters()):
        return None
    cfg = model.model_config().get("dtl", {})
    return (f"--lora_before_blocks {cfg.get('csn_blocks')} and --add_after_blocks {cfg.get('add_back_blocks')}: "
            f"no tapped block comes at or before an add-back block (of its stage, for Swin), so the side network "
            f"would add nothing and only the head would train; tap earlier blocks or add back after later ones")


def create_tuned_model(
    method: str, model_name: str, num_classes: int, dtl: Optional[DTLConfig] = None, lean: bool = False,
    settings: Optional[Any] = None, **kwargs: Any
) -> nn.Module:
    """The model of tuning method ``method`` (a name of :mod:`methods`); its configuration is ``dtl`` (DTL)
    or ``settings`` (a baseline's, e.g. LoRA's rank; the method's object or its dict form), ``kwargs`` are
    ``load_path``, ``pretrained`` and timm's backbone arguments. ``lean=True`` needs a method with lean mode."""
    try:
        entry = get_method(method)
    except ValueError as e:
        raise ModelSettingsError(str(e)) from None
    config = dtl if dtl is not None else settings
    if config is None or isinstance(config, dict):
        config = entry.config_from_dict(config or {})
    return entry.build(model_name, num_classes, config, lean=lean, **kwargs)


# timm's register_model reads this module's default_cfgs: the generic entry point's cfg (no weights of its own:
# the backbone's come with pretrained=True from the backbone's own timm cfg, or a local file / folder)
default_cfgs = generate_default_cfgs({f"{GENERIC_ENTRY}.untrained": PretrainedCfg(
    input_size=(3, 224, 224), interpolation="bicubic", crop_pct=1.0, crop_mode="squash", mean=DTL_MEAN, std=DTL_STD,
    num_classes=1000, first_conv="backbone.patch_embed.proj", classifier="head",
    notes=("DTL on the timm backbone named by backbone=...; it reports that backbone's normalisation",))})


@register_model
def dtl_timm(pretrained: bool = False, backbone: str = "vit_base_patch16_224", **kwargs: Any) -> nn.Module:
    """DTL / DTL+ on any supported timm backbone ``backbone`` (a timm name) that has no ``dtl_*`` entry point of
    its own: what ``save_for_hf`` folders and delta folders of such models name, so that
    ``timm.create_model("local-dir:...")`` rebuilds them."""
    family = family_of_name(backbone)  # an unsupported family is refused, listing the supported ones
    return create_dtl_variant(GENERIC_ENTRY, backbone, pretrained, family.wrapper, create_backbone, **kwargs)
