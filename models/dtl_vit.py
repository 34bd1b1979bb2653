"""DTL / DTL+ on a timm Vision Transformer (family ``vit``) and on timm's EVA / rotary-embedding ViTs (``eva``).

:class:`DTLVisionTransformer` owns an unmodified timm ``VisionTransformer`` (``self.backbone``, so its
weights keep timm's names and timm's loaders work) and runs its own loop over the blocks, with the
:class:`~models.side_network.CompactSideNetwork` tapping block inputs and adding back after later blocks.
:class:`DTLEva` does the same for a timm ``Eva`` (EVA-02 and the ``vit_*_rope_*`` models): its loop passes each
block the rotary position embedding exactly as ``Eva.forward_features`` does (``rope=`` the grid's embedding, or
block ``i``'s slice of it for ``rope_mixed`` models).

Head (as the original): mean over the *patch* tokens (the class token and any register tokens excluded) -> the
backbone's pre-trained final norm -> a fresh ``Linear``. The final norm is the module the architecture keeps it
in: ``backbone.norm`` (the paper's ViT, built with ``global_pool='token'``; timm's ``.npz`` loader fills it from
``Transformer/encoder_norm``), or ``backbone.fc_norm`` for models built to normalise after average pooling
(``global_pool='avg'``, ``fc_norm`` on: e.g. the ``*_gap_*`` / ``*_reg4_gap_*`` ViTs, where the DTL head then
equals timm's own pooling). An attention-pool head (``global_pool='map'``, SigLIP) is removed from the backbone
(:func:`~models.backbones.prepare_token_backbone`): the DTL head pools the mean over the patch tokens of the last
block's output, normalised by the backbone's final norm, instead of the attention pool's learned query.
This covers ViTs with and without a class token, register tokens (DINOv2-reg), pre-norm (CLIP), DeiT / DeiT III,
FlexiViT and DINOv2 (patch 14, layer scale): the blocks are timm's, whatever they contain.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models import VisionTransformer, register_model
from timm.models.eva import Eva

from .backbones import (ORIGINAL_VIT_NAMES, VIT_DEFAULT_RANK, create_eva_backbone, create_vit_backbone,
                        prepare_token_backbone)
from .config import DTLConfig
from .convert import convert_original_vit
from .dtl_base import DTLBase, SideSum, find_random_ops
from .families import register_family
from .lean import LowRankSideSum, lean_run
from .side_network import CompactSideNetwork
from .timm_api import ViTTimmMixin, create_dtl_variant, dtl_default_cfgs

__all__ = ["DTLVisionTransformer", "DTLEva", "create_vit_backbone", "vit_default_blocks", "ORIGINAL_VIT_NAMES",
           "VIT_DEFAULT_RANK"]

#: the baselines implemented on token ViTs (VPT-deep needs ``VisionTransformer``'s ``_pos_embed``)
_VIT_BASELINES = ("full", "linear", "bitfit", "lora", "adapter", "adaptformer", "vpt", "ssf")


def vit_default_blocks(backbone: nn.Module) -> Tuple[List[int], List[int]]:
    """The paper's ViT-B selection generalised to any depth: taps on every block, add-back on the second half
    (0-11 / 6-11 for 12 blocks)."""
    depth = len(backbone.blocks)
    return list(range(depth)), list(range(depth // 2, depth))


@register_family(
    "vit", title="ViT", backbone_classes=(VisionTransformer,), timm_modules=("vision_transformer", "deit"),
    create_backbone=create_vit_backbone, prepare=prepare_token_backbone, default_rank=VIT_DEFAULT_RANK,
    default_blocks=vit_default_blocks, plus_fusion_size=3, original_names=ORIGINAL_VIT_NAMES,
    recipe_names=frozenset(ORIGINAL_VIT_NAMES.values()), converter=convert_original_vit, baselines=_VIT_BASELINES,
)
class DTLVisionTransformer(ViTTimmMixin, DTLBase):
    """A frozen timm ViT plus a trainable Compact Side Network and classifier head.

    Args:
        backbone: a timm ``VisionTransformer`` with ``num_classes=0`` and no attention pool
            (:func:`~models.backbones.create_vit_backbone`, :func:`~models.backbones.prepare_token_backbone`).
        num_classes: classes of the new head.
        dtl: side-network settings; ``None`` block selections default to all blocks (taps) and the second
            half of the blocks (add-back), i.e. 0-11 / 6-11 for ViT-B/16 as in the paper; ``r=None`` gives 2.
        lean: recompute in backward what the default path stores (see :mod:`models.lean`); same values,
            a fraction of the training memory. Also settable later with :meth:`set_lean`.
        mean, std: the input normalisation ``pretrained_cfg`` reports (default:
            :func:`~models.families.model_normalization` of the backbone).
    """

    backbone_class: type = VisionTransformer

    def __init__(
        self, backbone: nn.Module, num_classes: int, dtl: Optional[DTLConfig] = None, lean: bool = False,
        mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        self._check_backbone_class(backbone)
        if getattr(backbone, "attn_pool", None) is not None:
            raise ValueError("remove the backbone's attention pool first (models.backbones.prepare_token_backbone)")
        self.backbone = backbone
        self.dtl_cfg = self._resolve_config(dtl)
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
        self._finish_init(num_classes, lean, mean, std)

    def final_norm(self) -> nn.Module:
        """The backbone's final norm: ``.norm``, or ``.fc_norm`` when the architecture keeps it there."""
        bb = self.backbone
        fc_norm = getattr(bb, "fc_norm", None)
        if isinstance(bb.norm, nn.Identity) and fc_norm is not None:
            return fc_norm
        return bb.norm

    def block_fns(self, grid: Tuple[int, int]) -> List[Callable[[torch.Tensor], torch.Tensor]]:
        """Block ``i`` as a function of its input tokens (for ``VisionTransformer``: the block itself)."""
        return list(self.backbone.blocks)

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
            return lean_run(self.block_fns(grid)[start:], range(start, depth), x, side, s, grid=grid, prefix=prefix)
        return self.run_blocks(x, start, len(self.backbone.blocks), s, grid)[0]

    def run_blocks(self, x: torch.Tensor, start: int, end: int, s: SideSum,
                   grid: Tuple[int, int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The default (not lean) block loop: blocks ``start..end-1`` with the side network's taps and
        additions, each block through :meth:`run_block` (gradient checkpointing); returns ``(x, side sum)``
        so that a caller (``forward_intermediates``) can continue from ``end``."""
        side, prefix = self.side, self.num_prefix_tokens
        if isinstance(s, LowRankSideSum):
            s = s.dense()
        blocks = self.block_fns(grid)
        for i in range(start, end):
            s = side.tap(s, i, x)
            x = self.run_block(blocks[i], x)
            x = side.inject(x, s, i, grid=grid, prefix=prefix)
        return x, s

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> mean over the patch tokens (``global_pool='avg'``, timm's ``''``: none) -> the final norm ->
        head (the original's order)."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.final_norm()(x)
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
        blocks = self.block_fns(self.patch_grid(x))
        h = self.embed(x)
        for i in range(wanted[-1] + 1):
            if i in wanted:
                out[i] = h
            if i < wanted[-1]:
                h = blocks[i](h)
        return out



@register_family(
    "eva", title="EVA", backbone_classes=(Eva,), timm_modules=("eva",), create_backbone=create_eva_backbone,
    prepare=prepare_token_backbone, default_rank=VIT_DEFAULT_RANK, default_blocks=vit_default_blocks,
    plus_fusion_size=3, baselines=("full", "linear", "bitfit"),
)
class DTLEva(DTLVisionTransformer):
    """DTL / DTL+ on a timm ``Eva`` (EVA-02, ``vit_*_rope_*``): as :class:`DTLVisionTransformer`, and each block
    gets the rotary position embedding of the patch grid (``rope=``) exactly as ``Eva.forward_features`` passes
    it (block ``i``'s slice for ``rope_mixed`` models). Patch dropout (which also drops rotary positions) is not
    supported."""

    backbone_class = Eva

    def __init__(self, backbone: nn.Module, num_classes: int, dtl: Optional[DTLConfig] = None, lean: bool = False,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> None:
        if getattr(backbone, "patch_drop", None) is not None:
            raise ValueError("DTL on an Eva backbone does not support patch dropout (patch_drop_rate > 0)")
        super().__init__(backbone, num_classes, dtl, lean=lean, mean=mean, std=std)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, prefix tokens, positional embedding, pre-norm: the input of block 0."""
        bb = self.backbone
        x, _ = bb._pos_embed(bb.patch_embed(x))
        return bb.norm_pre(x)

    def rope(self, grid: Tuple[int, int]) -> Optional[torch.Tensor]:
        """The rotary embedding of patch grid ``grid``, computed as ``Eva._pos_embed`` computes it."""
        bb = self.backbone
        if bb.rope is None:
            return None
        if bb.dynamic_img_size:
            return bb.rope.get_embed(shape=grid)
        if hasattr(bb.rope, "feat_shape"):
            return bb.rope.get_embed()
        return bb.rope.get_embed(shape=bb.patch_embed.grid_size)

    def block_fns(self, grid: Tuple[int, int]) -> List[Callable[[torch.Tensor], torch.Tensor]]:
        rope = self.rope(grid)
        if getattr(self.backbone, "rope_mixed", False) and rope is not None:
            return [partial(blk, rope=rope[i]) for i, blk in enumerate(self.backbone.blocks)]
        return [partial(blk, rope=rope) for blk in self.backbone.blocks]


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


# modern backbones (not in the paper), normalised with their weights' own statistics
modern_cfgs = dtl_default_cfgs({
    "dtl_vit_base_patch16_clip_224": "vit_base_patch16_clip_224.openai",
    "dtl_vit_base_patch16_siglip_224": "vit_base_patch16_siglip_224.webli",
    "dtl_vit_small_patch14_reg4_dinov2": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dtl_vit_base_patch14_reg4_dinov2": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dtl_eva02_base_patch14_224": "eva02_base_patch14_224.mim_in22k",
}, recipe_normalization=False)
default_cfgs.update(modern_cfgs)


@register_model
def dtl_vit_base_patch16_clip_224(pretrained: bool = False, **kwargs: Any) -> DTLVisionTransformer:
    """DTL on OpenAI CLIP ViT-B/16 (pre-norm); ``pretrained=True``: ``vit_base_patch16_clip_224.openai``."""
    return _create_dtl_vit("dtl_vit_base_patch16_clip_224", "vit_base_patch16_clip_224", pretrained, **kwargs)


@register_model
def dtl_vit_base_patch16_siglip_224(pretrained: bool = False, **kwargs: Any) -> DTLVisionTransformer:
    """DTL on SigLIP ViT-B/16 (no class token; its attention pool replaced by DTL's mean over the patch tokens);
    ``pretrained=True``: ``vit_base_patch16_siglip_224.webli``."""
    return _create_dtl_vit("dtl_vit_base_patch16_siglip_224", "vit_base_patch16_siglip_224", pretrained, **kwargs)


@register_model
def dtl_vit_small_patch14_reg4_dinov2(pretrained: bool = False, **kwargs: Any) -> DTLVisionTransformer:
    """DTL on DINOv2 ViT-S/14 with 4 register tokens; ``pretrained=True``: ``vit_small_patch14_reg4_dinov2.lvd142m``."""
    return _create_dtl_vit("dtl_vit_small_patch14_reg4_dinov2", "vit_small_patch14_reg4_dinov2", pretrained,
                           **kwargs)


@register_model
def dtl_vit_base_patch14_reg4_dinov2(pretrained: bool = False, **kwargs: Any) -> DTLVisionTransformer:
    """DTL on DINOv2 ViT-B/14 with 4 register tokens; ``pretrained=True``: ``vit_base_patch14_reg4_dinov2.lvd142m``."""
    return _create_dtl_vit("dtl_vit_base_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2", pretrained, **kwargs)


@register_model
def dtl_eva02_base_patch14_224(pretrained: bool = False, **kwargs: Any) -> DTLEva:
    """DTL on EVA-02 B/14 (rotary position embeddings); ``pretrained=True``: ``eva02_base_patch14_224.mim_in22k``."""
    return create_dtl_variant("dtl_eva02_base_patch14_224", "eva02_base_patch14_224", pretrained, DTLEva,
                              create_eva_backbone, **kwargs)
