"""The registry of tuning methods (in the style of timm's ``register_model`` and peft's ``register_peft_method``).

A :class:`Method` is everything the program knows about one ``--method``: the names results.json uses for it,
its capabilities (``--lean``, ``--cache_prefix``, ``--delta_folder``, the DTL flags), its configuration object
and where its model is built. The declaration is plain data: the parts that need torch (the builder, the
configuration class, the model check) are named as ``"module:attribute"`` and imported on first use, so that
``--method`` can be checked and a run named (``tools/run_table.py`` reading a launcher's flags) without torch.
A callable works too, for methods registered from code that has imported torch anyway.

This module imports nothing of the project's model code; :mod:`methods.builtin` registers DTL / DTL+ and the
baselines.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from utils.errors import ModelSettingsError, UnknownNameError

__all__ = ["Method", "register_method", "get_method", "method_names", "methods_with", "results_names",
           "featured_results_names", "parse_label", "CAPABILITIES", "Ref", "LEAN_SUFFIX"]

#: The capability names a :class:`Method` declares (``Method.supports(name)``).
CAPABILITIES = ("lean", "prefix_cache", "delta_folder", "uses_dtl_flags")

#: The benchmark tools' label of a method's lean mode: ``<results name>-lean`` (tools/bench_memory.py).
LEAN_SUFFIX = "-lean"

#: A callable, or where to import it from: ``"package.module:attribute"`` (``attribute`` may be dotted).
Ref = Union[str, Callable[..., Any]]


def resolve(ref: Ref) -> Callable[..., Any]:
    """The callable ``ref`` names (imported on first use); a callable is returned as it is."""
    if callable(ref):
        return ref
    module, sep, attr = str(ref).partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{ref!r} is not a 'package.module:attribute' reference")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Method:
    """One tuning method.

    Args:
        name: the ``--method`` value.
        builder: builds the tuned model: ``builder(method, model_name, num_classes, config, lean=..., **kwargs)``
            where ``method`` is this name, ``config`` is what :meth:`config_from_dict` returns and ``kwargs`` are
            ``load_path``, ``pretrained`` and timm's backbone arguments.
        config_class: the method's configuration class (``from_dict`` / ``to_dict``); ``None``: a plain dict.
        model_config_reader: the dict form of the configuration from a model's ``model_config()`` (deltas
            written before specs existed).
        checker: a structural check of a built model (the meta device is fine): a message when the model, as
            configured, would not train what the method means, ``None`` when it is fine.
        result_names: every name results.json may give the method (DTL: ``dtl`` and ``dtl+``).
        result_name: the results.json name of one configuration, from its dict form (torch-free).
        featured: the project's own method: its results names come first in results tables.
        lean, prefix_cache, delta_folder, uses_dtl_flags: the capabilities (:data:`CAPABILITIES`).
    """

    name: str
    builder: Ref
    config_class: Optional[Ref] = None
    model_config_reader: Optional[Ref] = None
    checker: Optional[Ref] = None
    result_names: Tuple[str, ...] = ()
    result_name: Optional[Callable[[Mapping[str, Any]], str]] = None
    featured: bool = False
    lean: bool = False
    prefix_cache: bool = False
    delta_folder: bool = False
    uses_dtl_flags: bool = False

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
        return self.result_name(config) if self.result_name is not None else self.name

    # -------------------------------------------------------------------- the parts imported on first use
    def build(self, model_name: str, num_classes: int, config: Any, lean: bool = False, **kwargs: Any) -> Any:
        """The tuned model (an ``nn.Module``); ``config`` as :meth:`config_from_dict` returns it. ``lean=True``
        needs the ``lean`` capability (:class:`~utils.errors.ModelSettingsError` otherwise)."""
        if lean and not self.lean:
            raise ModelSettingsError(f"lean mode (--lean) is implemented for "
                                     f"{', '.join(methods_with('lean')) or 'no method'} only, not for --method {self.name}")
        return resolve(self.builder)(self.name, model_name, num_classes, config, lean=lean, **kwargs)

    def config_from_dict(self, config: Mapping[str, Any]) -> Any:
        """The configuration object of its dict form (``ModelSpec.method_config``)."""
        return resolve(self.config_class).from_dict(dict(config)) if self.config_class else dict(config)

    def config_to_dict(self, config: Any) -> Dict[str, Any]:
        """The dict form stored in specs and checkpoints (the inverse of :meth:`config_from_dict`)."""
        return config.to_dict() if self.config_class else dict(config)

    def config_from_model(self, model_config: Mapping[str, Any]) -> Dict[str, Any]:
        """The configuration's dict form from a model's ``model_config()``."""
        if self.model_config_reader is None:
            return dict(model_config)
        return dict(resolve(self.model_config_reader)(model_config))

    def check(self, model: Any) -> Optional[str]:
        """The method's structural check of a built model: a message, or ``None`` when it is fine."""
        return resolve(self.checker)(model) if self.checker is not None else None


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


def results_names() -> Tuple[str, ...]:
    """Every name results.json may give a method, in registration order."""
    return tuple(n for m in _REGISTRY.values() for n in (m.result_names or (m.name,)))


def featured_results_names() -> Tuple[str, ...]:
    """The results names of the featured methods (DTL: ``dtl``, ``dtl+``): results tables list them first."""
    return tuple(n for m in _REGISTRY.values() if m.featured for n in (m.result_names or (m.name,)))


def get_method(name: str) -> Method:
    """The method of a ``--method`` value or a results.json name (``dtl+`` -> DTL);
    :class:`~utils.errors.UnknownNameError` listing the valid names otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownNameError(f"unknown --method {name!r}; choose from {', '.join(_REGISTRY)}") from None


def parse_label(label: str) -> Tuple[Method, str, bool]:
    """A benchmark tool's method label -- a results name, ``-lean`` appended for lean mode (``dtl+-lean``) --
    as ``(method, results name, lean)``; :class:`~utils.errors.UnknownNameError` for an unknown name."""
    lean = label.endswith(LEAN_SUFFIX)
    name = label[:-len(LEAN_SUFFIX)] if lean else label
    return get_method(name), name, lean
