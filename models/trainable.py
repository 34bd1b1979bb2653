"""The one rule that decides what trains and what goes into the small "delta" checkpoint.

Every tuned model in this project (DTL and the baseline methods) declares
``trainable_prefixes``: parameter-name prefixes that train, or a method ``is_trainable(name)`` for
finer rules.  Everything else is frozen and comes from the pre-trained backbone checkpoint, so the
delta (trainable tensors + the model's configuration) is all a run needs to save.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

__all__ = [
    "is_trainable", "apply_trainable_rule", "trainable_names", "delta_state_dict", "load_delta_state_dict",
    "ParamCounts", "count_parameters", "trainable_report", "HEAD_PREFIX",
]

HEAD_PREFIX = "head."


def is_trainable(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` of ``model`` trains, by the model's own declaration."""
    rule = getattr(model, "is_trainable", None)
    if callable(rule):
        return bool(rule(name))
    prefixes: Tuple[str, ...] = tuple(getattr(model, "trainable_prefixes", ()))
    if not prefixes:
        raise TypeError(f"{type(model).__name__} declares neither trainable_prefixes nor is_trainable()")
    return name.startswith(prefixes)


def apply_trainable_rule(model: nn.Module) -> nn.Module:
    """Set ``requires_grad`` of every parameter from the rule; returns the model."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(model, name))
    return model


def trainable_names(model: nn.Module) -> List[str]:
    return [n for n, _ in model.named_parameters() if is_trainable(model, n)]


def delta_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The trainable tensors only (detached, on the CPU), keyed by their names in ``model``."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if is_trainable(model, n)}


def load_delta_state_dict(model: nn.Module, delta: Mapping[str, torch.Tensor], source: str = "delta") -> None:
    """Load trainable tensors; every trainable tensor must be present, with its shape, and nothing else.

    Raises ``ValueError`` naming ``source`` and the offending keys.
    """
    expected = {n: p for n, p in model.named_parameters() if is_trainable(model, n)}
    missing = sorted(set(expected) - set(delta))
    unexpected = sorted(set(delta) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(delta[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(delta))
        if tuple(delta[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes))
    if problems:
        raise ValueError(f"{source}: delta checkpoint does not fit the model: " + ", ".join(problems))
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(delta[k].to(dtype=p.dtype, device=p.device))


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    trainable_excl_head: int

    @property
    def head(self) -> int:
        return self.trainable - self.trainable_excl_head


def count_parameters(model: nn.Module) -> ParamCounts:
    """Element counts: all parameters, trainable (by the rule), trainable without the classifier head."""
    total = trainable = excl = 0
    for n, p in model.named_parameters():
        total += p.numel()
        if is_trainable(model, n):
            trainable += p.numel()
            if not n.startswith(HEAD_PREFIX):
                excl += p.numel()
    return ParamCounts(total, trainable, excl)


def trainable_report(model: nn.Module, max_rows: Optional[int] = 40) -> str:
    """A readable table of the trainable tensors and the counts, like peft's ``print_trainable_parameters``."""
    rows = [(n, tuple(p.shape), p.numel()) for n, p in model.named_parameters() if is_trainable(model, n)]
    counts = count_parameters(model)
    width = max([len(r[0]) for r in rows] + [10])
    lines = [f"{'trainable tensor':<{width}}  {'shape':<16} {'numel':>10}"]
    shown = rows if max_rows is None or len(rows) <= max_rows else rows[: max_rows - 1]
    for n, shape, numel in shown:
        lines.append(f"{n:<{width}}  {str(shape):<16} {numel:>10,}")
    if len(shown) < len(rows):
        rest = rows[len(shown):]
        lines.append(f"{'... ' + str(len(rest)) + ' more':<{width}}  {'':<16} {sum(r[2] for r in rest):>10,}")
    lines.append(
        f"trainable: {counts.trainable:,} ({100.0 * counts.trainable / max(counts.total, 1):.4f}% of {counts.total:,}); "
        f"without head: {counts.trainable_excl_head:,}; head: {counts.head:,}"
    )
    return "\n".join(lines)
