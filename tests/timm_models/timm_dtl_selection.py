"""Which ``dtl_*`` models timm's tests run on, and how timm's model lists classify them.

``DTL_TIMM_TEST_MODELS``: comma-separated ``dtl_*`` architectures (default: the tiny ViT and Swin), or ``all``.
A DTL model is classified as its backbone is: timm's name filters (``'vit_*'``) and module filters
(``'vision_transformer'``) are matched against the backbone as well as against the ``dtl_*`` name.
"""
from __future__ import annotations

import fnmatch
import os
from typing import Iterable, List, Optional, Tuple, Union

import timm
from timm.models import model_entrypoint

import models  # noqa: F401 - registers the dtl_* entry points

TINY = ("dtl_vit_tiny_patch16_224", "dtl_swin_tiny_patch4_window7_224")
REAL_LIST_MODELS = timm.list_models


def selected_archs() -> Optional[Tuple[str, ...]]:
    spec = os.environ.get("DTL_TIMM_TEST_MODELS", ",".join(TINY)).strip()
    if spec == "all":
        return None
    return tuple(s.strip() for s in spec.split(",") if s.strip())


def _strs(value: Union[str, Iterable[str], None]) -> List[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def backbone_name(name: str) -> str:
    """``dtl_vit_tiny_patch16_224.tag`` -> ``vit_tiny_patch16_224.tag``."""
    return name[len("dtl_"):]


def backbone_module(name: str) -> str:
    """The timm module of the backbone architecture (``vision_transformer``, ``swin_transformer``)."""
    arch = backbone_name(name).split(".")[0]
    return model_entrypoint(arch).__module__.split(".")[-1]


def dtl_list_models(
    filter: Union[str, Iterable[str]] = "",
    module: Union[str, Iterable[str]] = "",
    pretrained: bool = False,
    exclude_filters: Union[str, Iterable[str]] = "",
    name_matches_cfg: bool = False,
    include_tags: Optional[bool] = None,
) -> List[str]:
    """``timm.list_models`` restricted to the selected ``dtl_*`` models, filters matched as described above."""
    names = REAL_LIST_MODELS("dtl_*", pretrained=pretrained, name_matches_cfg=name_matches_cfg,
                             include_tags=include_tags)
    sel = selected_archs()
    if sel is not None:
        names = [n for n in names if n.split(".")[0] in sel]

    def hit(n: str, patterns: List[str]) -> bool:
        return any(fnmatch.fnmatch(n, p) or fnmatch.fnmatch(backbone_name(n), p) for p in patterns)

    if _strs(filter):
        names = [n for n in names if hit(n, _strs(filter))]
    if _strs(module):
        names = [n for n in names if any(fnmatch.fnmatch(backbone_module(n), p) for p in _strs(module))]
    if _strs(exclude_filters):
        names = [n for n in names if not hit(n, _strs(exclude_filters))]
    return names
