"""Read-only and plain forms of nested values: the mappings inside frozen specs (:class:`FrozenDict`,
:func:`freeze`) and their JSON/YAML-friendly, comparable form (:func:`thaw`: dicts and lists). Kept free of torch,
so that light tools (run_table's flag comparison) share them."""
from __future__ import annotations

from typing import Any, Dict, Mapping

__all__ = ["FrozenDict", "freeze", "thaw"]


class FrozenDict(dict):
    """A read-only dict (hashable; pickles and deep-copies as itself): the mappings inside a frozen spec."""

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a spec is read-only: build a new one with .replace(...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _readonly  # type: ignore

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self.items()))

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def __deepcopy__(self, memo: Dict[int, Any]) -> "FrozenDict":
        return self


def freeze(value: Any) -> Any:
    """A read-only copy: mappings become :class:`FrozenDict` (keys sorted), lists tuples."""
    if isinstance(value, Mapping):
        return FrozenDict({k: freeze(value[k]) for k in sorted(value)})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The plain (JSON/YAML-friendly) form of a :func:`freeze` d value: dicts and lists."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value
