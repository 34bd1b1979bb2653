"""Convert state dicts written by the original DTL code (timm 0.5.4 layout) to this project's layout.

Original ViT keys: backbone tensors at the top level (``blocks.3.attn.qkv.weight``), the side network as
``lora_dict.<block>.lora_A`` / ``lora_B`` and ``lora_fusion.weight``, the classifier as ``head.*``.
Here: ``backbone.<timm 1.x name>``, ``side.taps.<block>.lora_A``, ``side.fusion.conv.weight``, ``head.*``.
Taps that the original created but that can never reach an add-back block do not exist here and are dropped.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping

import torch
import torch.nn as nn

__all__ = ["convert_original_vit", "convert_original_state_dict"]

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


def convert_original_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Dispatch on the model's architecture (``model.model_config()['arch']``)."""
    arch = model.model_config()["arch"]
    if arch == "vit":
        return convert_original_vit(state_dict, model)
    if arch == "swin":
        from .dtl_swin import convert_original_swin

        return convert_original_swin(state_dict, model)
    raise ValueError(f"no converter for architecture {arch!r}")
