"""Optimiser, learning-rate schedule, loss functions and EMA of the original recipe (docs/method.md)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler

__all__ = [
    "param_groups", "create_optimizer", "create_scheduler", "create_losses", "create_mixup",
    "TrainableEMA",
]


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two AdamW groups over the trainable tensors: weight decay for names not ending in ``.bias``, none for
    biases (the name rule of the original; 1-D tensors such as norm scales are *not* exempted)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def create_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with default betas/eps over :func:`param_groups`."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)


def create_scheduler(optimizer: torch.optim.Optimizer, *, epochs: int, warmup_epochs: int, min_lr: float,
                     warmup_lr: float) -> CosineLRScheduler:
    """timm ``CosineLRScheduler(t_initial=epochs, lr_min, warmup_t=warmup_epochs, warmup_lr_init,
    cycle_decay=0.5)``; call ``step(epoch + 1)`` after epoch ``epoch`` (0-based), so epoch ``e`` runs at the
    schedule's value at ``t = e``."""
    return CosineLRScheduler(
        optimizer,
        t_initial=max(epochs, 1),
        lr_min=min_lr,
        warmup_t=warmup_epochs,
        warmup_lr_init=warmup_lr,
        cycle_decay=0.5,
        t_in_epochs=True,
    )


def create_mixup(num_classes: int, *, mixup: float, cutmix: float, prob: float, smoothing: float) -> Optional[Mixup]:
    """timm ``Mixup`` when mixup or cutmix is on (label smoothing folded in), else ``None``."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, label_smoothing=smoothing,
                 num_classes=num_classes)


def create_losses(*, smoothing: float, mixup_active: bool) -> Tuple[nn.Module, nn.Module]:
    """(train loss, eval loss): soft-target CE with mixup, label-smoothing CE with ``smoothing``, else CE."""
    if mixup_active:
        train = SoftTargetCrossEntropy()
    elif smoothing > 0:
        train = LabelSmoothingCrossEntropy(smoothing=smoothing)
    else:
        train = nn.CrossEntropyLoss()
    return train, nn.CrossEntropyLoss(reduction="sum")


class TrainableEMA:
    """Exponential moving average of the *trainable* tensors only (the frozen backbone never changes).

    ``update()`` after each optimiser step: ``ema = decay * ema + (1 - decay) * param``.  ``swap()`` exchanges
    the model's tensors with the averages (call twice to swap back), for evaluation and saving.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        for n, p in self.params.items():
            tmp = p.detach().clone()
            p.copy_(self.shadow[n])
            self.shadow[n].copy_(tmp)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {n: t.detach().cpu().clone() for n, t in self.shadow.items()}

    def load_state_dict(self, sd: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        if set(sd) != set(self.shadow):
            raise ValueError(f"{source}: EMA tensors do not match the model's trainable tensors")
        with torch.no_grad():
            for n, t in sd.items():
                self.shadow[n].copy_(t)
