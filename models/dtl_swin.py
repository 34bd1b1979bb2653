"""DTL / DTL+ on a timm Swin Transformer.

:class:`DTLSwinTransformer` owns an unmodified timm 1.x ``SwinTransformer`` (``self.backbone``, so its weights
keep timm's names and timm's loaders and checkpoint filter work) and runs its own loop over the stages and
blocks, with one :class:`~models.side_network.CompactSideNetwork` per stage.

What differs from ViT (docs/method.md, section 1.2):

- blocks are numbered globally across stages (Swin-B, depths 2-2-18-2: stage 2 = blocks 4-21);
- the side sum ``s`` restarts at 0 at every stage (stages have different widths), so a stage gets a side
  network only if one of its taps can reach one of *its own* add-back blocks; a tap in a stage without
  add-back blocks could never receive a gradient and is not created;
- DTL+: one depthwise convolution per stage that has add-back blocks, over the stage's ``H x W`` token grid
  (timm 1.x keeps Swin tokens as ``B x H x W x C``), shared by that stage's add-back blocks;
- timm 1.x puts patch merging at the *start* of stages 1..n (the original, timm 0.5.4, at the *end* of stages
  0..n-1): here the injection after the last block of stage ``j`` happens before stage ``j+1``'s merging,
  which is the same computation;
- head: the backbone's final LayerNorm -> mean over tokens -> a fresh ``Linear`` (trunc-normal std .02, bias 0,
  as timm 0.5.4's Swin initialised its classifier).

Lean mode (:mod:`models.lean`, ``lean=True`` / :meth:`DTLSwinTransformer.set_lean`) and the frozen-prefix cache
(:mod:`engine.prefix_cache`) work as for ViT: each stage's blocks run through :func:`~models.lean.lean_run` with
that stage's side sum, patch merging through :func:`~models.lean.lean_call`; the prefix ends at the first
add-back block, and since the side sum restarts at every stage only the taps of that block's stage before it
are recorded.

Default block selections (config ``None``), the paper's Swin-B rule generalised to any depths: let stage 2 (the
deep stage; the last stage when there are fewer than 3) start at global block ``a`` and have ``d`` blocks;
``csn_blocks = a .. end`` and ``add_back_blocks = min(a + d // 2 + 1, a + d - 1) .. end`` (the ``min`` only
matters for stages of fewer than 4 blocks: add-back then still starts inside stage 2).  Swin-B (2, 2, 18, 2):
4-23 / 14-23 (the paper's); Swin-S (2, 2, 18, 2): the same; Swin-T (2, 2, 6, 2): 4-11 / 8-11 (as the Swin
reference fixtures).  Default rank for Swin: ``r = 4``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models import SwinTransformer, SwinTransformerV2, register_model

from .backbones import (ORIGINAL_SWIN_NAMES, SWIN_DEFAULT_RANK, create_swin_backbone, create_swinv2_backbone,
                        prepare_hierarchical_backbone)
from .config import DTLConfig
from .convert import convert_original_swin
from .dtl_base import DTLBase, SideSum, find_random_ops
from .families import register_family
from .lean import LowRankSideSum, lean_call, lean_run
from .side_network import CompactSideNetwork, used_taps
from .timm_api import SwinTimmMixin, create_dtl_variant, dtl_default_cfgs

__all__ = ["DTLSwinTransformer", "DTLSwinTransformerV2", "create_swin_backbone", "swin_default_blocks",
           "ORIGINAL_SWIN_NAMES", "SWIN_DEFAULT_RANK"]


def swin_default_blocks(depths: Sequence[int]) -> Tuple[List[int], List[int]]:
    """Default ``(csn_blocks, add_back_blocks)`` for stage depths ``depths`` (see the module docstring)."""
    depths = list(depths)
    if not depths or min(depths) < 1:
        raise ValueError(f"Swin stage depths must be positive, got {depths}")
    stage = min(2, len(depths) - 1)
    start = sum(depths[:stage])
    total = sum(depths)
    # the paper's 14 = 4 + 18 // 2 + 1 for Swin-B; kept inside the stage for very shallow stages
    first_add = min(start + depths[stage] // 2 + 1, start + depths[stage] - 1)
    return list(range(start, total)), list(range(first_add, total))


def _stage_default_blocks(backbone: nn.Module) -> Tuple[List[int], List[int]]:
    return swin_default_blocks([len(stage.blocks) for stage in backbone.layers])


#: the baselines implemented on Swin (VPT-deep prompts need a token sequence)
_SWIN_BASELINES = ("full", "linear", "bitfit", "lora", "adapter", "adaptformer", "ssf")


@register_family(
    "swin", title="Swin", backbone_classes=(SwinTransformer,), timm_modules=("swin_transformer",),
    create_backbone=create_swin_backbone, prepare=prepare_hierarchical_backbone, default_rank=SWIN_DEFAULT_RANK,
    default_blocks=_stage_default_blocks, plus_fusion_size=5, original_names=ORIGINAL_SWIN_NAMES,
    recipe_names=frozenset(ORIGINAL_SWIN_NAMES.values()), converter=convert_original_swin,
    baselines=_SWIN_BASELINES,
)
class DTLSwinTransformer(SwinTimmMixin, DTLBase):
    """A frozen timm Swin Transformer plus trainable per-stage Compact Side Networks and classifier head.

    Args:
        backbone: a timm ``SwinTransformer`` built with ``num_classes=0`` (its final norm in ``.norm``).
        num_classes: classes of the new head.
        dtl: side-network settings (global block indices); ``None`` gives ``r = 4``, ``beta = 100`` and the
            default blocks of :func:`swin_default_blocks` (4-23 / 14-23 for Swin-B, as in the paper).
        lean: recompute in backward what the default path stores (see :mod:`models.lean`); same values,
            a fraction of the training memory. Also settable later with :meth:`set_lean`.
        mean, std: the input normalisation ``pretrained_cfg`` reports (default:
            :func:`~models.families.model_normalization` of the backbone).
    """

    backbone_class: type = SwinTransformer

    def __init__(
        self, backbone: nn.Module, num_classes: int, dtl: Optional[DTLConfig] = None, lean: bool = False,
        mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        self._check_backbone_class(backbone)
        if isinstance(backbone.norm, nn.Identity):
            raise ValueError("the Swin backbone must keep its final norm in .norm")
        self.depths: Tuple[int, ...] = tuple(len(stage.blocks) for stage in backbone.layers)
        starts = [0]
        for d in self.depths[:-1]:
            starts.append(starts[-1] + d)
        self.stage_starts: Tuple[int, ...] = tuple(starts)
        self.backbone = backbone
        self.dtl_cfg = self._resolve_config(dtl, sum(self.depths))
        self.num_classes = num_classes
        self.num_features = backbone.num_features
        self.stage_dims: Tuple[int, ...] = tuple(stage.blocks[0].dim for stage in backbone.layers)

        csn, add_back = set(self.dtl_cfg.csn_blocks), set(self.dtl_cfg.add_back_blocks)
        side: Dict[str, CompactSideNetwork] = {}
        for j, (start, depth) in enumerate(zip(self.stage_starts, self.depths)):
            blocks = range(start, start + depth)
            stage_csn = [i for i in blocks if i in csn]
            stage_add = [i for i in blocks if i in add_back]
            # The sum restarts at this stage: only taps reaching one of this stage's add-back blocks matter.
            if not used_taps(stage_csn, stage_add):
                continue
            side[str(j)] = CompactSideNetwork(
                self.stage_dims[j],
                self.dtl_cfg.r,
                stage_csn,
                stage_add,
                beta=self.dtl_cfg.beta,
                fusion_size=self.dtl_cfg.fusion_size,
            )
        self.side = nn.ModuleDict(side)
        self._finish_init(num_classes, lean, mean, std)

    def stage_of(self, block: int) -> int:
        """The stage holding global block ``block``."""
        for j in range(len(self.depths) - 1, -1, -1):
            if block >= self.stage_starts[j]:
                if block >= self.stage_starts[j] + self.depths[j]:
                    break
                return j
        raise IndexError(f"block {block} out of range (the backbone has {sum(self.depths)} blocks)")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding: images ``B x 3 x H x W`` -> tokens ``B x h x w x C`` entering block 0."""
        return self.backbone.patch_embed(x)

    def forward_stage(
        self,
        x: torch.Tensor,
        stage_idx: int,
        start: Optional[int] = None,
        s: SideSum = None,
    ) -> torch.Tensor:
        """Run stage ``stage_idx`` with its side network.

        With ``start=None``, ``x`` is the stage's input *before* its patch merging (the previous stage's
        output) and all blocks run. With a global block index ``start`` inside the stage, ``x`` is the input of
        block ``start`` (after merging) and ``s`` the side sum this stage accumulated before ``start`` (in lean
        mode also a :class:`~models.lean.LowRankSideSum`).
        """
        stage = self.backbone.layers[stage_idx]
        first = self.stage_starts[stage_idx]
        end = first + self.depths[stage_idx]
        if start is None:
            x = lean_call(stage.downsample, x) if self.lean else stage.downsample(x)
            start, s = first, None
        elif not first <= start < end:
            raise ValueError(f"block {start} is not in stage {stage_idx}")
        side = self.side[str(stage_idx)] if str(stage_idx) in self.side else None
        if side is None and s is not None and not (isinstance(s, LowRankSideSum) and s.is_zero):
            raise ValueError(f"stage {stage_idx} has no side network, but a side sum was given")
        if self.lean:
            return lean_run(stage.blocks[start - first:], range(start, end), x, side, s)
        if isinstance(s, LowRankSideSum):
            s = s.dense()
        for i in range(start, end):
            if side is not None:
                s = side.tap(s, i, x)
            x = self.run_block(stage.blocks[i - first], x)
            if side is not None:
                x = side.inject(x, s, i)
        return x

    def forward_blocks(self, x: torch.Tensor, start: int = 0, s: SideSum = None,
                       grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Run global blocks ``start..`` to the end (no final norm).

        ``x`` is the input of block ``start`` (for the first block of a stage: after that stage's patch
        merging) and ``s`` the side sum accumulated in ``start``'s stage before it. ``grid`` is not needed
        (Swin tokens are ``B x h x w x C``).
        """
        j = self.stage_of(start)
        x = self.forward_stage(x, j, start=start, s=s)
        for k in range(j + 1, len(self.depths)):
            x = self.forward_stage(x, k)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``B x h x w x C`` -> the final norm -> mean over tokens (``global_pool='avg'``, timm's ``''``:
        none) -> head (the original's order)."""
        x = self.backbone.norm(x)
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    # --- frozen prefix (engine.prefix_cache, tools/predict.py) -------------------------------------------
    # The blocks before the first add-back block ``a`` see inputs that no trainable tensor influences.  The
    # side sum restarts at every stage, so the only taps whose inputs matter before ``a`` are those of ``a``'s
    # own stage (a tap in an earlier stage could only reach an add-back block of that earlier stage, i.e. one
    # before ``a``; such taps do not exist).  "The input of block i" is the tensor block i receives: for the
    # first block of a stage, after that stage's patch merging.

    def prefix_side(self, resume: int) -> Optional[CompactSideNetwork]:
        """The side network of ``resume``'s stage (the sum restarts at every stage), if it has one."""
        stage = str(self.stage_of(resume))
        return self.side[stage] if stage in self.side else None

    def prefix_random_ops(self, resume: Optional[int] = None) -> List[str]:
        """The stochastic operations (drop-path, dropout with a rate > 0) on the way to the input of block
        ``resume`` (default: the first add-back block), as ``"name (p=...)"`` strings: the patch embedding,
        the patch merging of every stage up to ``resume``'s and the blocks before ``resume``.

        A prefix cache records these inputs once, in eval mode, so it is exact only when this list is empty.
        """
        if resume is None:
            resume = self.prefix_plan()[1]
        last = self.stage_of(resume)
        bb = self.backbone
        mods = [("patch_embed", bb.patch_embed)]
        for j in range(last + 1):
            stage, first = bb.layers[j], self.stage_starts[j]
            mods.append((f"layers.{j}.downsample", stage.downsample))
            mods += [(f"layers.{j}.blocks.{i - first}", stage.blocks[i - first])
                     for i in range(first, min(resume, first + self.depths[j]))]
        return find_random_ops(mods)

    @torch.no_grad()
    def record_block_inputs(self, x: torch.Tensor, blocks: Sequence[int]) -> Dict[int, torch.Tensor]:
        """Images -> ``{i: input of block i}`` for ``blocks``, all at or before the first add-back block.

        Runs the frozen backbone only (the side networks add nothing before the first add-back block).
        """
        wanted = sorted(set(int(i) for i in blocks))
        if not wanted:
            return {}
        first_add = self.first_add_back() if self.dtl_cfg.add_back_blocks else sum(self.depths) - 1
        if wanted[0] < 0 or wanted[-1] > first_add:
            raise ValueError(f"block inputs {wanted}: only blocks 0..{first_add} (the first add-back block) can "
                             "be recorded; later inputs depend on the side network")
        last = wanted[-1]
        out: Dict[int, torch.Tensor] = {}
        h = self.embed(x)
        for j, stage in enumerate(self.backbone.layers):
            first = self.stage_starts[j]
            if first > last:
                break
            h = stage.downsample(h)
            for i in range(first, min(first + self.depths[j], last + 1)):
                if i in wanted:
                    out[i] = h
                if i < last:
                    h = stage.blocks[i - first](h)
        return out


@register_family(
    "swinv2", title="Swin V2", backbone_classes=(SwinTransformerV2,), timm_modules=("swin_transformer_v2",),
    create_backbone=create_swinv2_backbone, prepare=prepare_hierarchical_backbone, default_rank=SWIN_DEFAULT_RANK,
    default_blocks=_stage_default_blocks, plus_fusion_size=5, baselines=("full", "linear", "bitfit"),
)
class DTLSwinTransformerV2(DTLSwinTransformer):
    """DTL / DTL+ on a timm ``SwinTransformerV2`` (``swinv2_*``): the same stages (patch merging at the start of
    stages 1..n, tokens ``B x H x W x C``, a final norm in ``.norm``), so the same per-stage side networks and
    block loop as :class:`DTLSwinTransformer`; Swin V2's residual post-norm and cosine attention are inside timm's
    blocks."""

    backbone_class = SwinTransformerV2


def _create_dtl_swin(variant: str, arch: str, pretrained: bool = False, **kwargs: Any) -> DTLSwinTransformer:
    return create_dtl_variant(variant, arch, pretrained, DTLSwinTransformer, create_swin_backbone, **kwargs)


# timm pretrained cfgs: the tag names the *backbone* weights (the side network and the head start fresh)
default_cfgs = dtl_default_cfgs({
    "dtl_swin_tiny_patch4_window7_224": "swin_tiny_patch4_window7_224.ms_in1k",
    "dtl_swin_small_patch4_window7_224": "swin_small_patch4_window7_224.ms_in22k_ft_in1k",
    "dtl_swin_base_patch4_window7_224": "swin_base_patch4_window7_224.ms_in22k",  # the paper's
})


@register_model
def dtl_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> DTLSwinTransformer:
    """DTL on Swin-T (window 7, 224); ``pretrained=True``: timm's ``swin_tiny_patch4_window7_224.ms_in1k``."""
    return _create_dtl_swin("dtl_swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224", pretrained, **kwargs)


@register_model
def dtl_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> DTLSwinTransformer:
    """DTL on Swin-S (window 7, 224); ``pretrained=True``: ``swin_small_patch4_window7_224.ms_in22k_ft_in1k``."""
    return _create_dtl_swin("dtl_swin_small_patch4_window7_224", "swin_small_patch4_window7_224", pretrained, **kwargs)


@register_model
def dtl_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> DTLSwinTransformer:
    """DTL on Swin-B (window 7, 224); ``pretrained=True``: ImageNet-22k ``swin_base_patch4_window7_224.ms_in22k``
    (the paper's)."""
    return _create_dtl_swin("dtl_swin_base_patch4_window7_224", "swin_base_patch4_window7_224", pretrained, **kwargs)


# modern backbones (not in the paper), normalised with their weights' own statistics
default_cfgs.update(dtl_default_cfgs({"dtl_swinv2_tiny_window8_256": "swinv2_tiny_window8_256.ms_in1k"},
                                     recipe_normalization=False))


@register_model
def dtl_swinv2_tiny_window8_256(pretrained: bool = False, **kwargs: Any) -> DTLSwinTransformerV2:
    """DTL on Swin V2-T (window 8, 256); ``pretrained=True``: timm's ``swinv2_tiny_window8_256.ms_in1k``."""
    return create_dtl_variant("dtl_swinv2_tiny_window8_256", "swinv2_tiny_window8_256", pretrained,
                              DTLSwinTransformerV2, create_swinv2_backbone, **kwargs)
