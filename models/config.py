"""The one configuration object of the DTL method (peft-style): what the side network looks like."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["DTLConfig", "ModelSettingsError", "parse_blocks", "format_blocks", "pop_model_kwargs"]


from methods.builtin import dtl_results_name
from utils.blocks import format_blocks, parse_blocks
from utils.errors import ModelSettingsError


@dataclass
class DTLConfig:
    """Settings of the Compact Side Network.

    Args:
        r: rank of every low-rank tap ``g_i``; ``None`` = the backbone's default (ViT 2, Swin 4).
        beta: slope of the swish gate ``s * sigmoid(beta * s)``.
        fusion_size: kernel of DTL+'s depthwise convolution; ``0`` means plain DTL.
        csn_blocks: blocks whose *input* is tapped (global indices); ``None`` = the backbone's default.
        add_back_blocks: blocks after which the gated side sum is added; ``None`` = the backbone's default.
    """

    r: Optional[int] = None
    beta: float = 100.0
    fusion_size: int = 0
    csn_blocks: Optional[List[int]] = None
    add_back_blocks: Optional[List[int]] = None

    def __post_init__(self) -> None:
        self.csn_blocks = parse_blocks(self.csn_blocks, "csn_blocks")
        self.add_back_blocks = parse_blocks(self.add_back_blocks, "add_back_blocks")
        if self.r is not None and self.r < 1:
            raise ModelSettingsError(f"DTL rank r must be >= 1, got {self.r}")
        if self.fusion_size < 0:
            raise ModelSettingsError(f"fusion_size must be >= 0 (0 = DTL), got {self.fusion_size}")

    @property
    def method(self) -> str:
        """The results.json name: ``'dtl'``, or ``'dtl+'`` with a fusion kernel (:mod:`methods.builtin`)."""
        return dtl_results_name(self.fusion_size)

    def resolve(
        self, num_blocks: int, default_csn: Sequence[int], default_add_back: Sequence[int], default_r: int
    ) -> "DTLConfig":
        """Fill in backbone defaults and check the block indices against ``num_blocks``."""
        cfg = dataclasses.replace(
            self,
            r=default_r if self.r is None else self.r,
            csn_blocks=list(default_csn) if self.csn_blocks is None else list(self.csn_blocks),
            add_back_blocks=list(default_add_back) if self.add_back_blocks is None else list(self.add_back_blocks),
        )
        for name in ("csn_blocks", "add_back_blocks"):
            bad = [i for i in getattr(cfg, name) if not 0 <= i < num_blocks]
            if bad:
                raise ModelSettingsError(
                    f"{name} contains {bad}, but the backbone has {num_blocks} blocks (valid: 0-{num_blocks - 1})"
                )
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DTLConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ModelSettingsError(f"unknown DTL config keys: {sorted(unknown)}")
        return cls(**d)


DTL_KEYS = ("r", "beta", "fusion_size", "csn_blocks", "add_back_blocks")


def pop_model_kwargs(kwargs: Dict[str, Any]) -> "tuple[int, DTLConfig, bool]":
    """Split a timm entry point's kwargs: returns ``(num_classes, DTLConfig, lean)`` and leaves in ``kwargs``
    only what goes to the backbone. DTL settings come either as ``dtl=DTLConfig(...)`` or as loose keys."""
    for unused in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(unused, None)
    num_classes = kwargs.pop("num_classes", 1000)
    lean = bool(kwargs.pop("lean", False))
    dtl = kwargs.pop("dtl", None)
    loose = {k: kwargs.pop(k) for k in DTL_KEYS if k in kwargs}
    if dtl is None:
        dtl = DTLConfig(**loose)
    elif loose:
        raise ModelSettingsError(f"pass either dtl=DTLConfig(...) or the keys {sorted(loose)}, not both")
    return num_classes, dtl, lean
