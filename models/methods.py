"""The registry of tuning methods (in the style of timm's ``register_model`` and peft's ``register_peft_method``).

A :class:`Method` is everything the program knows about one ``--method``: the names results.json uses for it,
its configuration (a dict form for specs and checkpoints), how to build the tuned model, and its capabilities
(``--lean``, ``--cache_prefix``, ``--delta_folder``, the DTL flags, the backbone families it supports). DTL (and
DTL+, the same method with a fusion kernel) and every baseline of :mod:`models.baselines` are registered here
the same way; ``--method``, :func:`models.factory.create_tuned_model`, ``--eval_only`` and the flag checks read
the registry instead of comparing names.

Adding a method: write its model (e.g. a :class:`models.baselines.BaselineModel` subclass) and call
``register_method(Method(name=..., build=..., ...))`` once at import time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch.nn as nn

from utils.errors import UnknownNameError

from .baselines import BASELINE_METHODS, baseline_class, baseline_settings, create_baseline_model
from .config import DTLConfig

__all__ = ["Method", "register_method", "get_method", "method_names", "methods_with", "CAPABILITIES",
           "results_method_name"]

#: The capability names a :class:`Method` declares (``Method.supports(name)``).
CAPABILITIES = ("lean", "prefix_cache", "delta_folder", "uses_dtl_flags")


@dataclass(frozen=True)
class Method:
    """One tuning method.

    Args:
        name: the ``--method`` value.
        build: ``build(model_name, num_classes, config, lean=..., **kwargs) -> nn.Module``; ``config`` is what
            :attr:`config_from_dict` returns, ``kwargs`` are ``load_path``, ``pretrained`` and timm's backbone
            arguments.
        config_from_dict: the method's configuration object from its dict form (``ModelSpec.method_config``).
        config_to_dict: the inverse (the dict stored in specs and checkpoints).
        config_from_model: the dict form from a model's ``model_config()`` (deltas written before specs).
        result_names: every name results.json may give the method (DTL: ``dtl`` and ``dtl+``).
        result_name: the results.json name of one configuration.
        archs: the backbone families it is implemented for.
        lean, prefix_cache, delta_folder, uses_dtl_flags: the capabilities (:data:`CAPABILITIES`).
        check: a structural check of a built model (meta device is fine): a message when the model, as
            configured, would not train what the method means (``None``: fine).
    """

    name: str
    build: Callable[..., nn.Module]
    config_from_dict: Callable[[Mapping[str, Any]], Any] = dict
    config_to_dict: Callable[[Any], Dict[str, Any]] = dict
    config_from_model: Callable[[Mapping[str, Any]], Dict[str, Any]] = baseline_settings
    result_names: Tuple[str, ...] = ()
    result_name: Optional[Callable[[Any], str]] = None
    archs: Tuple[str, ...] = ("vit", "swin")
    lean: bool = False
    prefix_cache: bool = False
    delta_folder: bool = False
    uses_dtl_flags: bool = False
    check: Optional[Callable[[nn.Module], Optional[str]]] = None

    def supports(self, capability: str) -> bool:
        """Whether the method has ``capability`` (one of :data:`CAPABILITIES`)."""
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
        return bool(getattr(self, capability))

    def names(self) -> Tuple[str, ...]:
        """``name`` and every results.json name."""
        return (self.name, *[n for n in self.result_names if n != self.name])

    def results_name(self, config: Mapping[str, Any]) -> str:
        """The results.json name of the method with configuration ``config`` (dict form)."""
        return self.result_name(self.config_from_dict(config)) if self.result_name is not None else self.name


_REGISTRY: Dict[str, Method] = {}
_BY_NAME: Dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (its ``--method`` name and results names must be new); returns it."""
    taken = [n for n in method.names() if n in _BY_NAME]
    if taken:
        raise ValueError(f"method name(s) {taken} already registered")
    _REGISTRY[method.name] = method
    for n in method.names():
        _BY_NAME[n] = method
    return method


def method_names() -> Tuple[str, ...]:
    """The ``--method`` choices, in registration order."""
    return tuple(_REGISTRY)


def methods_with(capability: str) -> Tuple[str, ...]:
    """The ``--method`` names that have ``capability``."""
    return tuple(n for n, m in _REGISTRY.items() if m.supports(capability))


def get_method(name: str) -> Method:
    """The method of a ``--method`` value or a results.json name (``dtl+`` -> DTL);
    :class:`~utils.errors.UnknownNameError` listing the valid names otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownNameError(f"unknown --method {name!r}; choose from {', '.join(_REGISTRY)}") from None


def results_method_name(method: str, config: Mapping[str, Any]) -> str:
    """results.json's method of ``--method method`` with configuration ``config`` (``dtl`` with a fusion
    kernel: ``dtl+``)."""
    return get_method(method).results_name(config)


# ---------------------------------------------------------------------------------------------------- DTL
def _build_dtl(model_name: str, num_classes: int, config: DTLConfig, lean: bool = False, **kwargs: Any) -> nn.Module:
    from .factory import create_dtl_model  # the factory dispatches through this registry

    return create_dtl_model(model_name, num_classes, config, lean=lean, **kwargs)


def _dtl_side_network_reaches_head(model: nn.Module) -> Optional[str]:
    """A block selection in which no tap comes at or before an add-back block trains the head alone."""
    if any(n.endswith("lora_A") and ".taps." in f".{n}" for n, _ in model.named_parameters()):
        return None
    cfg = model.model_config().get("dtl", {})
    return (f"--lora_before_blocks {cfg.get('csn_blocks')} and --add_after_blocks {cfg.get('add_back_blocks')}: "
            f"no tapped block comes at or before an add-back block (of its stage, for Swin), so the side network "
            f"would add nothing and only the head would train; tap earlier blocks or add back after later ones")


register_method(Method(
    name="dtl", build=_build_dtl, config_from_dict=lambda d: DTLConfig.from_dict(dict(d)),
    config_to_dict=lambda c: c.to_dict(), config_from_model=lambda cfg: dict(cfg.get("dtl") or {}),
    result_names=("dtl", "dtl+"), result_name=lambda c: c.method,
    lean=True, prefix_cache=True, delta_folder=True, uses_dtl_flags=True, check=_dtl_side_network_reaches_head,
))


# ---------------------------------------------------------------------------------------------- baselines
def _baseline_builder(name: str) -> Callable[..., nn.Module]:
    def build(model_name: str, num_classes: int, config: Mapping[str, Any], lean: bool = False,
              **kwargs: Any) -> nn.Module:
        return create_baseline_model(name, model_name, num_classes, settings=config or None, **kwargs)

    return build


for _name in BASELINE_METHODS:
    register_method(Method(name=_name, build=_baseline_builder(_name), result_names=(_name,),
                           archs=tuple(baseline_class(_name).supported_archs())))
