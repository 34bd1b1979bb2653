"""The classifier head shared by every tuned model (DTL and the baselines): timm's classifier API over it."""
from __future__ import annotations

import torch.nn as nn

from .trainable import apply_trainable_rule

__all__ = ["ClassifierMixin"]


class ClassifierMixin:
    """``get_classifier`` / ``reset_classifier`` over a fresh ``self.head`` Linear.

    The model defines ``num_features`` and ``reset_head()`` (its initialisation of a new head); a new head is
    made trainable by the model's trainable rule.
    """

    head: nn.Module
    num_features: int
    num_classes: int

    def reset_head(self) -> None:
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_head()
        apply_trainable_rule(self)
