"""What the two DTL wrappers (:class:`~models.dtl_vit.DTLVisionTransformer`, :class:`~models.dtl_swin.
DTLSwinTransformer`) share: the same methods with the same signatures and meanings.

* ``embed(images)``: the input of block 0; ``patch_grid(images)``: the patch grid ``(H, W)`` the side network's
  DTL+ fusion needs (ViT; ``None`` for Swin, whose tokens are ``B x H x W x C`` and carry it).
* ``forward_blocks(x, start=0, s=None, grid=None)``: blocks ``start..`` (global indices) with the side network;
  ``x`` is the input of block ``start`` and ``s`` the side sum accumulated before it.
* ``forward_features(images)``: the tokens after the last block, **before** the final norm (both wrappers).
* ``forward_head(tokens)``: final norm, pooling and the classifier, in the original's order (ViT: mean of the
  patch tokens, then the norm; Swin: the norm, then the mean).
* ``forward(images or {block: inputs})``; ``model_config()``; ``set_lean()``.
* timm's model interface (:class:`~models.timm_api.DTLTimmMixin`, a base of this class): ``pretrained_cfg`` /
  ``default_cfg`` describing the wrapper, ``reset_classifier(n, global_pool)``, ``set_grad_checkpointing``
  (every block through ``run_block``), ``feature_info``, ``no_weight_decay``...; the wrappers add
  ``forward_intermediates`` and ``group_matcher`` (:class:`~models.timm_api.ViTTimmMixin`,
  :class:`~models.timm_api.SwinTimmMixin`).
* The frozen prefix (the blocks before the first add-back block, whose inputs no trainable tensor influences):
  ``prefix_plan()``, ``prefix_side(resume)``, ``prefix_random_ops()``, ``record_block_inputs()`` and
  ``forward_from_prefix(cached, grid=None)``, used by the prefix cache and by ``tools/predict.py``.

Naming: the flags ``--lora_before_blocks`` / ``--add_after_blocks`` (the original's) are ``csn_blocks`` /
``add_back_blocks`` in :class:`~models.config.DTLConfig` -- the blocks whose *input* a low-rank tap reads, and
the blocks after which the side sum is added back; a tap's tensors are ``lora_A``/``lora_B`` (as the original).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from .config import DTLConfig
from .families import get_family, model_normalization
from .head import ClassifierMixin
from .lean import LowRankSideSum
from .side_network import CompactSideNetwork
from .timm_api import DTLTimmMixin
from .trainable import apply_trainable_rule

__all__ = ["DTLBase", "find_random_ops"]

SideSum = Union[None, torch.Tensor, LowRankSideSum]


def find_random_ops(modules: "Iterable[Tuple[str, nn.Module]]") -> List[str]:
    """``"name (p=...)"`` of every drop-path (timm ``DropPath.drop_prob``), dropout or patch dropout with a
    positive rate inside the given ``(name, module)`` pairs: what a prefix cache would switch off."""
    found = []
    for prefix, mod in modules:
        for name, m in mod.named_modules():
            p = getattr(m, "drop_prob", None)  # timm DropPath
            if p is None and isinstance(m, nn.Dropout):
                p = m.p
            if p is None and type(m).__name__ == "PatchDropout":
                p = getattr(m, "prob", 0.0)
            if p:
                found.append(f"{prefix}{'.' + name if name else ''} (p={float(p):g})")
    return found


class DTLBase(DTLTimmMixin, ClassifierMixin, nn.Module):
    """A frozen timm backbone (``self.backbone``), a trainable side network (``self.side``) and head.

    ``lean`` is a property of :class:`~models.timm_api.DTLTimmMixin` (refused together with gradient
    checkpointing)."""

    arch: str = ""
    trainable_prefixes = ("side.", "head.")
    backbone_class: type = nn.Module  #: the timm backbone class a wrapper runs (set by each subclass)
    backbone: nn.Module

    def _check_backbone_class(self, backbone: nn.Module) -> None:
        """Refuse a backbone that is not the timm class this wrapper runs (``backbone_class``)."""
        if not isinstance(backbone, self.backbone_class):
            raise TypeError(f"{type(self).__name__} wraps a timm {self.backbone_class.__name__}, "
                            f"got {type(backbone).__name__}")

    def _resolve_config(self, dtl: Optional[DTLConfig], num_blocks: Optional[int] = None) -> DTLConfig:
        """``dtl`` with its ``None`` fields set to the family's defaults (:class:`~models.families.BackboneFamily`
        ``default_rank`` / ``default_blocks``) for ``self.backbone`` of ``num_blocks`` blocks (default: its
        ``blocks``)."""
        fam = get_family(self.arch)
        if num_blocks is None:
            num_blocks = len(self.backbone.blocks)
        return (dtl or DTLConfig()).resolve(num_blocks, *fam.default_blocks(self.backbone),
                                            default_r=fam.default_rank)

    def _finish_init(self, num_classes: int, lean: bool, mean: Optional[Sequence[float]] = None,
                     std: Optional[Sequence[float]] = None) -> None:
        """Subclasses call this last: a fresh head, the trainable rule, lean mode, the timm interface
        (``pretrained_cfg`` describing this wrapper, ``feature_info``, ...) with normalisation ``mean`` / ``std``
        (default: :func:`~models.families.model_normalization` of the backbone)."""
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_head()
        apply_trainable_rule(self)
        self.lean = bool(lean)
        if mean is None or std is None:
            mean, std = model_normalization(self.backbone)
        self._init_timm_api(mean, std)

    def reset_head(self) -> None:
        """Initialise a fresh head as the original did, for ViT and Swin alike: trunc-normal std .02, bias 0.

        (timm 0.5.4's Swin initialises its classifier so; its ViT, built by the original with
        ``init_weights('')``, applies the weight init without module names, so the zero-init branch for ``head``
        never runs and the head gets the same generic Linear init.)
        """
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def set_lean(self, lean: bool = True) -> "DTLBase":
        """Switch lean mode (:mod:`models.lean`) on or off; returns the model."""
        self.lean = bool(lean)
        return self

    # --- the subclass's architecture ----------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def patch_grid(self, x: torch.Tensor) -> Optional[Tuple[int, int]]:
        return None

    def forward_blocks(self, x: torch.Tensor, start: int = 0, s: SideSum = None,
                       grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def prefix_side(self, resume: int) -> Optional[CompactSideNetwork]:
        """The side network whose taps before block ``resume`` feed it (``None``: no such side network)."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> tokens after the last block, before the final norm."""
        return self.forward_blocks(self.embed(x), grid=self.patch_grid(x))

    def forward(self, x: Union[torch.Tensor, Mapping[int, torch.Tensor]]) -> torch.Tensor:
        """Images -> logits; a mapping of recorded block inputs (a prefix-cache batch) goes to
        :meth:`forward_from_prefix` (so a DDP-wrapped model can train from the cache)."""
        if isinstance(x, Mapping):
            return self.forward_from_prefix(x)
        return self.forward_head(self.forward_features(x))

    def model_config(self) -> Dict[str, Any]:
        """What is needed to rebuild this model (stored in delta checkpoints)."""
        return {"arch": self.arch, "num_classes": self.num_classes, "dtl": self.dtl_cfg.to_dict()}

    def first_add_back(self) -> int:
        """The first add-back block (global index) of the configuration."""
        add_back = self.dtl_cfg.add_back_blocks
        if not add_back:
            raise ValueError("this DTL model has no add-back block: the side network never reaches the output")
        return min(add_back)

    def prefix_plan(self) -> Tuple[List[int], int]:
        """``(blocks whose inputs to record, resume block)``: the taps feeding the first add-back block ``a``
        that lie before it, then ``a`` itself (whose input the forward resumes from)."""
        resume = self.first_add_back()
        side = self.prefix_side(resume)
        taps = sorted(int(k) for k in side.taps if int(k) < resume) if side is not None else []
        return taps + [resume], resume

    def prefix_side_sum(self, resume: int, inputs: Mapping[int, torch.Tensor], taps: Iterable[int]) -> SideSum:
        """The side sum at block ``resume`` from the recorded inputs of ``taps`` (lean: in factored form)."""
        side = self.prefix_side(resume)
        if side is None:
            return None
        if self.lean:
            s = LowRankSideSum(side)
            for i in taps:
                s.tap(i, inputs[i])
            return s
        s = None
        for i in taps:
            s = side.tap(s, i, inputs[i])
        return s

    def forward_from_prefix(self, cached: Mapping[int, torch.Tensor],
                            grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Logits from recorded block inputs (:meth:`prefix_plan`), running only the tail blocks.

        ``cached`` maps block index -> input tokens (any float dtype; cast to the model's). ``grid``: ViT's patch
        grid (default: the patch embedding's).
        """
        record, resume = self.prefix_plan()
        missing = [i for i in record if i not in cached]
        if missing:
            raise KeyError(f"forward_from_prefix: no recorded input for blocks {missing} (have {sorted(cached)})")
        dtype = self.backbone.patch_embed.proj.weight.dtype
        inputs = {i: cached[i].to(dtype) for i in record}
        s = self.prefix_side_sum(resume, inputs, record[:-1])
        return self.forward_head(self.forward_blocks(inputs[resume], start=resume, s=s, grid=grid))
