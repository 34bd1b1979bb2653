"""Convert state dicts written by the original DTL code (timm 0.5.4 layout) to this project's layout.

Original ViT keys: backbone tensors at the top level (``blocks.3.attn.qkv.weight``), the side network as
``lora_dict.<block>.lora_A`` / ``lora_B`` and ``lora_fusion.weight``, the classifier as ``head.*``.
Here: ``backbone.<timm 1.x name>``, ``side.taps.<block>.lora_A``, ``side.fusion.conv.weight``, ``head.*``.
Original Swin keys: ``lora_dict.<block>.lora_{A,B}`` (global block index), ``lora_fusions.<stage>.weight``;
here ``side.<stage>.taps.<block>.lora_{A,B}`` and ``side.<stage>.fusion.conv.weight``.
Taps that the original created but that can never reach an add-back block do not exist here and are dropped.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping

import torch
import torch.nn as nn
from timm.models.swin_transformer import checkpoint_filter_fn

from .families import get_family

__all__ = ["convert_original_vit", "convert_original_swin", "convert_original_state_dict"]

_VIT_TAP = re.compile(r"^lora_dict\.(\d+)\.(lora_[AB])$")


def convert_original_vit(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an original DTL ViT state dict onto :class:`~models.dtl_vit.DTLVisionTransformer` keys."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _VIT_TAP.match(key)
        if m:
            block, which = m.groups()
            if model.side.has_tap(int(block)):
                out[f"side.taps.{block}.{which}"] = value
        elif key == "lora_fusion.weight":
            if model.side.fusion is not None:
                out["side.fusion.conv.weight"] = value
        elif key.startswith("head."):
            out[key] = value
        else:
            out[f"backbone.{key}"] = value
    return out


_SWIN_TAP = re.compile(r"^lora_dict\.(\d+)\.(lora_[AB])$")
_SWIN_FUSION = re.compile(r"^lora_fusions\.(\d+)\.weight$")
_SWIN_ALIAS = re.compile(r"^layers\.\d+\.(lora_dict|lora_fusions)\.")


def convert_original_swin(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an original DTL Swin state dict (timm 0.5.4 layout) onto :class:`~models.dtl_swin.DTLSwinTransformer` keys.

    ``lora_dict.<block>.lora_{A,B}`` -> ``side.<stage>.taps.<block>.lora_{A,B}`` and ``lora_fusions.<stage>.weight``
    -> ``side.<stage>.fusion.conv.weight`` (only for tensors that exist here: the original also creates taps
    and fusions that can never receive a gradient); the aliases ``layers.<i>.lora_dict.*`` /
    ``layers.<i>.lora_fusions.*`` are ignored; ``head.*`` stays; the backbone part goes through timm's Swin
    ``checkpoint_filter_fn`` (patch merging ``layers.<i>.downsample`` -> ``layers.<i+1>.downsample``, buffers
    dropped) and gets the ``backbone.`` prefix.
    """
    out: Dict[str, torch.Tensor] = {}
    backbone_sd: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if _SWIN_ALIAS.match(key):
            continue
        m = _SWIN_TAP.match(key)
        if m:
            block, which = int(m.group(1)), m.group(2)
            stage = str(model.stage_of(block))
            if stage in model.side and model.side[stage].has_tap(block):
                out[f"side.{stage}.taps.{block}.{which}"] = value
            continue
        m = _SWIN_FUSION.match(key)
        if m:
            stage = m.group(1)
            if stage in model.side and model.side[stage].fusion is not None:
                out[f"side.{stage}.fusion.conv.weight"] = value
            continue
        if key.startswith("head."):
            out[key] = value
        else:
            backbone_sd[key] = value
    if backbone_sd:
        backbone_sd = checkpoint_filter_fn(backbone_sd, model.backbone)
        out.update({f"backbone.{k}": v for k, v in backbone_sd.items()})
    return out


def convert_original_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """The converter of the model's backbone family (:attr:`~models.families.BackboneFamily.converter`;
    ``model.model_config()['arch']``)."""
    family = get_family(model.model_config()["arch"])
    if family.converter is None:
        raise ValueError(f"no converter of the original code's layout for the {family.name!r} family (the "
                         f"original implementation had ViT and Swin only)")
    return family.converter(state_dict, model)
