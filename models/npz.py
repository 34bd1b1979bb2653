"""Write a timm ViT backbone as a Google ``.npz`` checkpoint (the layout of ``ViT-B_16.npz``).

The inverse of timm's npz loader (``VisionTransformer.load_pretrained``): used by the embedded demo, which
pretrains a small ViT and hands it to the real loading path, and by the tests of that path.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn

__all__ = ["save_vit_npz", "vit_to_npz_dict"]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def vit_to_npz_dict(backbone: nn.Module, head: Optional[nn.Linear] = None) -> Dict[str, np.ndarray]:
    """Arrays keyed as in Google's ViT checkpoints (``Transformer/encoderblock_{i}/...``)."""
    w: Dict[str, np.ndarray] = {}
    pe = backbone.patch_embed.proj
    w["embedding/kernel"] = _np(pe.weight.permute(2, 3, 1, 0))  # (ph, pw, in, out)
    w["embedding/bias"] = _np(pe.bias)
    if backbone.cls_token is not None:
        w["cls"] = _np(backbone.cls_token)
    w["Transformer/posembed_input/pos_embedding"] = _np(backbone.pos_embed)
    w["Transformer/encoder_norm/scale"] = _np(backbone.norm.weight)
    w["Transformer/encoder_norm/bias"] = _np(backbone.norm.bias)
    for i, blk in enumerate(backbone.blocks):
        p = f"Transformer/encoderblock_{i}/"
        d = blk.attn.qkv.weight.shape[1]
        heads = blk.attn.num_heads
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = _np(blk.norm1.weight), _np(blk.norm1.bias)
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = _np(blk.norm2.weight), _np(blk.norm2.bias)
        qkv_w = blk.attn.qkv.weight.chunk(3, dim=0)
        qkv_b = blk.attn.qkv.bias.chunk(3, dim=0)
        for name, wt, bs in zip(("query", "key", "value"), qkv_w, qkv_b):
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = _np(wt.t().reshape(d, heads, -1))
            w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = _np(bs.reshape(heads, -1))
        proj = blk.attn.proj.weight  # (d, heads * head_dim)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = _np(proj.reshape(proj.shape[0], heads, -1).permute(1, 2, 0))
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = _np(blk.attn.proj.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = _np(fc.weight.t())
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = _np(fc.bias)
    if head is not None:
        w["head/kernel"] = _np(head.weight.t())
        w["head/bias"] = _np(head.bias)
    return w


def save_vit_npz(backbone: nn.Module, path: str, head: Optional[nn.Linear] = None) -> None:
    """Save ``backbone`` (a timm ``VisionTransformer``) to ``path`` in Google's npz layout, atomically."""
    arrays = vit_to_npz_dict(backbone, head)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
