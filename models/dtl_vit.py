"""DTL / DTL+ on a timm Vision Transformer.

:class:`DTLVisionTransformer` owns an unmodified timm ``VisionTransformer`` (``self.backbone``, so its
weights keep timm's names and timm's loaders work) and runs its own loop over the blocks, with the
:class:`~models.side_network.CompactSideNetwork` tapping block inputs and adding back after later blocks.

Head (as the original): mean over the *patch* tokens -> the backbone's pre-trained final LayerNorm ->
a fresh ``Linear``.  The backbone is built with ``global_pool='token'`` so that timm keeps the final norm in
``backbone.norm`` (timm's ``.npz`` loader fills it from ``Transformer/encoder_norm``; with
``global_pool='avg'`` timm would move it to an ``fc_norm`` that the loader skips).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models import VisionTransformer
from timm.models import register_model

from .backbones import ORIGINAL_VIT_NAMES, VIT_DEFAULT_RANK, create_vit_backbone
from .config import DTLConfig
from .dtl_base import DTLBase, SideSum, find_random_ops
from .lean import LowRankSideSum, lean_run
from .side_network import CompactSideNetwork
from .timm_api import ViTTimmMixin, create_dtl_variant, dtl_default_cfgs

__all__ = ["DTLVisionTransformer", "create_vit_backbone", "ORIGINAL_VIT_NAMES", "VIT_DEFAULT_RANK"]


class DTLVisionTransformer(ViTTimmMixin, DTLBase):
    """A frozen timm ViT plus a trainable Compact Side Network and classifier head.

    Args:
        backbone: a timm ``VisionTransformer`` built with ``global_pool='token'`` and ``num_classes=0``.
        num_classes: classes of the new head.
        dtl: side-network settings; ``None`` block selections default to all blocks (taps) and the second
            half of the blocks (add-back), i.e. 0-11 / 6-11 for ViT-B/16 as in the paper; ``r=None`` gives 2.
        lean: recompute in backward what the default path stores (see :mod:`models.lean`); same values,
            a fraction of the training memory. Also settable later with :meth:`set_lean`.
    """

    arch = "vit"

    def __init__(
        self, backbone: VisionTransformer, num_classes: int, dtl: Optional[DTLConfig] = None, lean: bool = False
    ) -> None:
        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"DTLVisionTransformer wraps a timm VisionTransformer, got {type(backbone).__name__}")
        if isinstance(backbone.norm, nn.Identity):
            raise ValueError("the ViT backbone must keep its final norm in .norm (build it with global_pool='token')")
        depth = len(backbone.blocks)
        dtl = dtl or DTLConfig()
        self.dtl_cfg = dtl.resolve(depth, range(depth), range(depth // 2, depth), default_r=VIT_DEFAULT_RANK)
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_features = self.embed_dim = backbone.embed_dim
        self.num_prefix_tokens = backbone.num_prefix_tokens
        self.side = CompactSideNetwork(
            backbone.embed_dim,
            self.dtl_cfg.r,
            self.dtl_cfg.csn_blocks,
            self.dtl_cfg.add_back_blocks,
            beta=self.dtl_cfg.beta,
            fusion_size=self.dtl_cfg.fusion_size,
        )
        self._finish_init(num_classes, lean)

    def patch_grid(self, x: torch.Tensor) -> Tuple[int, int]:
        """The patch grid (H, W) of image batch ``x``, from the patch embedding (never hard-coded)."""
        pe = self.backbone.patch_embed
        if hasattr(pe, "dynamic_feat_size"):
            return tuple(pe.dynamic_feat_size(x.shape[-2:]))
        return tuple(pe.grid_size)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, prefix tokens, positional embedding: the input of block 0."""
        bb = self.backbone
        x = bb.patch_embed(x)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        return bb.norm_pre(x)

    def forward_blocks(self, x: torch.Tensor, start: int = 0, s: SideSum = None,
                       grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Run blocks ``start..`` with the side network; ``s`` is the side sum accumulated before ``start``
        (in lean mode also a :class:`~models.lean.LowRankSideSum`), ``grid`` the patch grid (default: the
        patch embedding's)."""
        side, prefix = self.side, self.num_prefix_tokens
        if grid is None:
            grid = tuple(self.backbone.patch_embed.grid_size)
        if self.lean:
            depth = len(self.backbone.blocks)
            return lean_run(self.backbone.blocks[start:], range(start, depth), x, side, s, grid=grid, prefix=prefix)
        return self.run_blocks(x, start, len(self.backbone.blocks), s, grid)[0]

    def run_blocks(self, x: torch.Tensor, start: int, end: int, s: SideSum,
                   grid: Tuple[int, int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The default (not lean) block loop: blocks ``start..end-1`` with the side network's taps and
        additions, each block through :meth:`run_block` (gradient checkpointing); returns ``(x, side sum)``
        so that a caller (``forward_intermediates``) can continue from ``end``."""
        side, prefix = self.side, self.num_prefix_tokens
        if isinstance(s, LowRankSideSum):
            s = s.dense()
        for i in range(start, end):
            s = side.tap(s, i, x)
            x = self.run_block(self.backbone.blocks[i], x)
            x = side.inject(x, s, i, grid=grid, prefix=prefix)
        return x, s

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> mean over the patch tokens (``global_pool='avg'``, timm's ``''``: none) -> the final norm ->
        head (the original's order)."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.backbone.norm(x)
        return x if pre_logits else self.head(x)

    def prefix_side(self, resume: int) -> CompactSideNetwork:
        return self.side

    def prefix_random_ops(self, resume: Optional[int] = None) -> List[str]:
        """The stochastic operations (drop-path, dropout, patch dropout with a rate > 0) on the way to the
        input of block ``resume`` (default: the first add-back block), as ``"name (p=...)"`` strings.

        A prefix cache records these inputs once, in eval mode, so it is exact only when this list is empty.
        """
        if resume is None:
            resume = self.prefix_plan()[1]
        bb = self.backbone
        mods = [(n, getattr(bb, n)) for n in ("patch_embed", "pos_drop", "patch_drop", "norm_pre") if hasattr(bb, n)]
        mods += [(f"blocks.{i}", blk) for i, blk in enumerate(bb.blocks[:resume])]
        return find_random_ops(mods)

    @torch.no_grad()
    def record_block_inputs(self, x: torch.Tensor, blocks: List[int]) -> Dict[int, torch.Tensor]:
        """Images -> ``{i: input of block i}`` for ``blocks``, all before the first add-back block.

        Runs the frozen backbone only (the side network adds nothing before the first add-back block).
        """
        first_add = min(self.dtl_cfg.add_back_blocks) if self.dtl_cfg.add_back_blocks else len(self.backbone.blocks)
        wanted = sorted(set(blocks))
        if not wanted:
            return {}
        if wanted[-1] > first_add:
            raise ValueError(f"block inputs after the first add-back block ({first_add}) depend on the side network")
        out: Dict[int, torch.Tensor] = {}
        h = self.embed(x)
        for i in range(wanted[-1] + 1):
            if i in wanted:
                out[i] = h
            if i < wanted[-1]:
                h = self.backbone.blocks[i](h)
        return out


def _create_dtl_vit(variant: str, arch: str, pretrained: bool = False, **kwargs: Any) -> DTLVisionTransformer:
    return create_dtl_variant(variant, arch, pretrained, DTLVisionTransformer, create_vit_backbone, **kwargs)


# timm pretrained cfgs: the tag names the *backbone* weights (the side network and the head start fresh)
default_cfgs = dtl_default_cfgs({
    "dtl_vit_tiny_patch16_224": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "dtl_vit_small_patch16_224": "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "dtl_vit_base_patch16_224": "vit_base_patch16_224.orig_in21k",  # Google's ViT-B_16.npz (the paper's)
    "dtl_vit_large_patch16_224": "vit_large_patch16_224.orig_in21k",
})


@register_model
def dtl_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> DTLVisionTransformer:
    """DTL on ViT-Ti/16 (224); ``pretrained=True``: timm's ``vit_tiny_patch16_224.augreg_in21k_ft_in1k``."""
    return _create_dtl_vit("dtl_vit_tiny_patch16_224", "vit_tiny_patch16_224", pretrained, **kwargs)


@register_model
def dtl_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> DTLVisionTransformer:
    """DTL on ViT-S/16 (224); ``pretrained=True``: timm's ``vit_small_patch16_224.augreg_in21k_ft_in1k``."""
    return _create_dtl_vit("dtl_vit_small_patch16_224", "vit_small_patch16_224", pretrained, **kwargs)


@register_model
def dtl_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> DTLVisionTransformer:
    """DTL on ViT-B/16 (224); ``pretrained=True``: ImageNet-21k ``vit_base_patch16_224.orig_in21k`` (the paper's)."""
    return _create_dtl_vit("dtl_vit_base_patch16_224", "vit_base_patch16_224", pretrained, **kwargs)


@register_model
def dtl_vit_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> DTLVisionTransformer:
    """DTL on ViT-L/16 (224); ``pretrained=True``: ImageNet-21k ``vit_large_patch16_224.orig_in21k``."""
    return _create_dtl_vit("dtl_vit_large_patch16_224", "vit_large_patch16_224", pretrained, **kwargs)
