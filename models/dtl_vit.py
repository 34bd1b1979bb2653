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

from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.models import VisionTransformer
from timm.models import register_model

from .config import DTLConfig, pop_model_kwargs
from .head import ClassifierMixin
from .lean import LowRankSideSum, lean_run
from .prefix_cache import find_random_ops
from .side_network import CompactSideNetwork
from .timm_api import ViTTimmMixin, build_dtl_model, dtl_default_cfgs
from .trainable import apply_trainable_rule

__all__ = ["DTLVisionTransformer", "create_vit_backbone", "ORIGINAL_VIT_NAMES", "VIT_DEFAULT_RANK"]

VIT_DEFAULT_RANK = 2  # the paper's ViT-B/16 setting

# Names used by the original launchers (timm 0.5.4) -> timm 1.x architecture names.
ORIGINAL_VIT_NAMES: Dict[str, str] = {
    "vit_base_patch16_224_in21k": "vit_base_patch16_224",
    "vit_large_patch16_224_in21k": "vit_large_patch16_224",
    "vit_small_patch16_224_in21k": "vit_small_patch16_224",
    "vit_tiny_patch16_224_in21k": "vit_tiny_patch16_224",
}


class DTLVisionTransformer(ViTTimmMixin, ClassifierMixin, nn.Module):
    """A frozen timm ViT plus a trainable Compact Side Network and classifier head.

    Args:
        backbone: a timm ``VisionTransformer`` built with ``global_pool='token'`` and ``num_classes=0``.
        num_classes: classes of the new head.
        dtl: side-network settings; ``None`` block selections default to all blocks (taps) and the second
            half of the blocks (add-back), i.e. 0-11 / 6-11 for ViT-B/16 as in the paper; ``r=None`` gives 2.
        lean: recompute in backward what the default path stores (see :mod:`models.lean`); same values,
            a fraction of the training memory. Also settable later with :meth:`set_lean`.
    """

    trainable_prefixes = ("side.", "head.")

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
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_head()
        apply_trainable_rule(self)
        self.lean = bool(lean)
        self._init_timm_api()  # models.timm_api: pretrained_cfg describing this wrapper, feature_info, ...

    def set_lean(self, lean: bool = True) -> "DTLVisionTransformer":
        """Switch lean mode (:mod:`models.lean`) on or off; returns the model."""
        self.lean = bool(lean)
        return self

    def reset_head(self) -> None:
        """Zero-initialise the head, as timm 0.5.4's ViT (the original's) did for a fresh classifier."""
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

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

    def forward_blocks(
        self,
        x: torch.Tensor,
        grid: Tuple[int, int],
        start: int = 0,
        s: Union[None, torch.Tensor, LowRankSideSum] = None,
    ) -> torch.Tensor:
        """Run blocks ``start..`` with the side network; ``s`` is the side sum accumulated before ``start``.

        In lean mode ``s`` may also be a :class:`~models.lean.LowRankSideSum` (kept in factored form).
        """
        side, prefix = self.side, self.num_prefix_tokens
        if self.lean:
            depth = len(self.backbone.blocks)
            return lean_run(self.backbone.blocks[start:], range(start, depth), x, side, s, grid=grid, prefix=prefix)
        if isinstance(s, LowRankSideSum):
            s = s.dense()
        for i in range(start, len(self.backbone.blocks)):
            s = side.tap(s, i, x)
            x = self.run_block(self.backbone.blocks[i], x)
            x = side.inject(x, s, i, grid=grid, prefix=prefix)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.patch_grid(x)
        return self.forward_blocks(self.embed(x), grid)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.backbone.norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Union[torch.Tensor, Mapping[int, torch.Tensor]]) -> torch.Tensor:
        """Images -> logits; a mapping of recorded block inputs (a prefix-cache batch) goes to
        :meth:`forward_from_prefix` (so a DDP-wrapped model can train from the cache)."""
        if isinstance(x, Mapping):
            return self.forward_from_prefix(x)
        return self.forward_head(self.forward_features(x))

    def model_config(self) -> Dict[str, Any]:
        """What is needed to rebuild this model (stored in delta checkpoints)."""
        return {"arch": "vit", "num_classes": self.num_classes, "dtl": self.dtl_cfg.to_dict()}

    # --- frozen prefix (models.prefix_cache, tools/predict.py) -------------------------------------------
    # The blocks before the first add-back block see inputs that no trainable tensor influences.  A cache
    # records, per image, the inputs of the taps among them and the input of the first add-back block, and
    # training resumes from there with forward_from_prefix.

    def prefix_plan(self) -> Tuple[List[int], int]:
        """``(blocks whose inputs to record, resume block)``: the taps before the first add-back block ``a``,
        then ``a`` itself (whose input the forward resumes from)."""
        add_back = self.dtl_cfg.add_back_blocks
        if not add_back:
            raise ValueError("this DTL model has no add-back block: the side network never reaches the output")
        resume = min(add_back)
        taps = sorted(int(k) for k in self.side.taps if int(k) < resume)
        return taps + [resume], resume

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

    def forward_from_prefix(self, cached: Mapping[int, torch.Tensor], grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Logits from recorded block inputs (:meth:`prefix_plan`), running only the tail blocks.

        ``cached`` maps block index -> input tokens (any float dtype; cast to the model's). ``grid`` defaults
        to the patch embedding's grid.
        """
        record, resume = self.prefix_plan()
        missing = [i for i in record if i not in cached]
        if missing:
            raise KeyError(f"forward_from_prefix: no recorded input for blocks {missing} (have {sorted(cached)})")
        dtype = self.backbone.patch_embed.proj.weight.dtype
        if grid is None:
            grid = tuple(self.backbone.patch_embed.grid_size)
        s: Union[None, torch.Tensor, LowRankSideSum]
        if self.lean:
            s = LowRankSideSum(self.side)
            for i in record[:-1]:
                s.tap(i, cached[i].to(dtype))
        else:
            s = None
            for i in record[:-1]:
                s = self.side.tap(s, i, cached[i].to(dtype))
        x = self.forward_blocks(cached[resume].to(dtype), grid, start=resume, s=s)
        return self.forward_head(x)


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
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _create_dtl_vit(variant: str, arch: str, pretrained: bool = False, **kwargs: Any) -> DTLVisionTransformer:
    def make(**kw: Any) -> DTLVisionTransformer:
        num_classes, dtl, lean = pop_model_kwargs(kw)
        global_pool = kw.pop("global_pool", "avg")
        model = DTLVisionTransformer(create_vit_backbone(arch, **kw), num_classes, dtl, lean=lean)
        model.set_global_pool(global_pool)
        return model

    return build_dtl_model(variant, make, pretrained, default_out_indices=ViTTimmMixin.default_out_indices, **kwargs)


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
