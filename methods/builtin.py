"""The methods train.py knows: DTL (DTL+ is DTL with a fusion kernel) and the baselines of the paper's tables.

One line each. A baseline's model is a ``BaselineModel`` subclass in :mod:`models.baselines` (listed in its
``_CLASSES``); DTL's is the family's wrapper (:mod:`models.families`), built by :func:`models.factory.build_dtl`.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

from .registry import Method, register_method

__all__ = ["dtl_results_name", "BASELINES"]


def dtl_results_name(fusion_size: int) -> str:
    """results.json's name of DTL with depthwise kernel ``fusion_size``: ``dtl``, or ``dtl+`` when it is > 0."""
    return "dtl+" if int(fusion_size or 0) > 0 else "dtl"


def _dtl_settings(model_config: Mapping[str, Any]) -> Dict[str, Any]:
    """DTL's settings in a DTL model's ``model_config()`` (its ``dtl`` block)."""
    return dict(model_config.get("dtl") or {})


register_method(Method(
    name="dtl", builder="models.factory:build_dtl", config_class="models.config:DTLConfig",
    model_config_reader=_dtl_settings, checker="models.factory:dtl_side_network_reaches_head",
    result_names=("dtl", "dtl+"), result_name=lambda config: dtl_results_name(config.get("fusion_size", 0)),
    featured=True, lean=True, prefix_cache=True, delta_folder=True, uses_dtl_flags=True,
))

#: The baselines, in the order of the paper's tables (each a ``BaselineModel`` of models/baselines.py).
BASELINES = ("full", "linear", "bitfit", "lora", "adapter", "adaptformer", "vpt", "ssf")
for _name in BASELINES:
    register_method(Method(name=_name, builder="models.baselines:build_baseline",
                           model_config_reader="models.baselines:baseline_settings"))
