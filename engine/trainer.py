"""One model being trained or evaluated: optimiser, schedule, AMP, EMA, DDP wrapper (the original recipe:
AdamW without weight decay on biases, timm's cosine schedule with warm-up stepped once per epoch, fp16 autocast
with a gradient scaler under ``--amp``)."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from models import delta_state_dict, load_delta_state_dict
from utils.checkpoint import CheckpointError
from utils.distributed import DistInfo, all_reduce_sum
from utils.loader import CudaPrefetcher
from utils.metrics import TopKCounter
from utils import signals
from utils.optim import TrainableEMA, create_losses, create_mixup, create_optimizer, create_scheduler

from .spec import OptimSpec

__all__ = ["Trainer", "NonFiniteError", "effective_precision", "load_scaler_state", "PRECISIONS"]

_logger = logging.getLogger("train")


class NonFiniteError(FloatingPointError):
    """NaN or inf where a number was expected (training loss, evaluation logits): no result is written."""


def effective_precision(amp: bool, amp_dtype: str, device: torch.device) -> str:
    """What the forward passes run in: ``fp32`` (no ``--amp``, or ``--amp`` with float16 off CUDA: fp16 autocast
    is only used on a GPU), ``fp16`` (autocast + gradient scaler) or ``bf16`` (autocast, no scaler; also on the
    CPU)."""
    if not amp:
        return "fp32"
    if amp_dtype == "bfloat16":
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


#: The precisions a run trains in: float32, fp16 autocast with a gradient scaler, bf16 autocast.
PRECISIONS = ("fp32", "fp16", "bf16")


def load_scaler_state(scaler: torch.amp.GradScaler, state: Dict[str, Any], precision: str, source: str) -> None:
    """Load the fp16 gradient scaler's ``state`` of checkpoint ``source`` into ``scaler`` (of a run training in
    ``precision``). A checkpoint of a run without fp16 autocast holds none (a disabled scaler saves ``{}``, which
    ``GradScaler.load_state_dict`` refuses): the scaler then starts fresh, with a warning. (train.py refuses a
    precision change before this point for checkpoints that record their precision; this covers older ones.)"""
    if scaler.is_enabled():
        if state:
            scaler.load_state_dict(state)
        else:
            _logger.warning("%s has no fp16 gradient-scaler state (the interrupted run did not train with fp16 "
                            "autocast): the scaler starts fresh (scale %.0f), so the resumed run differs from "
                            "an uninterrupted one", source, scaler.get_scale())
    elif state:
        _logger.warning("%s holds fp16 gradient-scaler state, but this run trains in %s: ignored", source, precision)


class Trainer:
    """``train_one_epoch`` runs :meth:`train_step` on every batch and steps the schedule; ``evaluate`` counts
    correct predictions over all ranks. A batch is images or a prefix-cache batch ``{block: inputs}``."""

    def __init__(self, model: nn.Module, optim: OptimSpec, precision: str, dist: DistInfo, num_classes: int,
                 find_unused_parameters: bool = False) -> None:
        """``model`` trains with the recipe ``optim`` in ``precision`` (one of :data:`PRECISIONS`, the effective
        one: :func:`effective_precision`) on ``dist.device``; ``num_classes`` is the head's (mixup's one-hot
        targets); ``find_unused_parameters`` goes to DDP."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.optim = optim
        self.dist = dist
        self.device = dist.device
        self.model = model.to(self.device)
        self.optimizer = create_optimizer(self.model, optim.lr, optim.weight_decay)
        self.scheduler = create_scheduler(self.optimizer, epochs=optim.epochs, warmup_epochs=optim.warmup_epochs,
                                          min_lr=optim.min_lr, warmup_lr=optim.warmup_lr)
        self.mixup = create_mixup(num_classes, mixup=optim.mixup, cutmix=optim.cutmix, prob=optim.mixup_prob,
                                  smoothing=optim.smoothing)
        self.train_loss_fn, self.eval_loss_fn = create_losses(smoothing=optim.smoothing,
                                                              mixup_active=self.mixup is not None)
        self.precision = precision
        self.amp = precision != "fp32"
        self.amp_dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        self.ema = TrainableEMA(self.model, optim.ema_decay) if optim.ema else None
        self.ddp_model: nn.Module = self.model
        if dist.distributed:
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters)

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype of the forward passes, ``None`` in float32."""
        return self.amp_dtype if self.amp else None

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _batches(self, loader):
        """The batches of ``loader`` on the device. A SIGINT/SIGTERM received meanwhile raises at the next batch
        (:func:`utils.signals.check`: the handler's own raise can be swallowed), and none raises while the
        DataLoader forks its workers (the after-fork hooks would swallow it)."""
        with signals.deferred():
            batches = iter(loader)
        for x, y in batches:
            signals.check()
            if isinstance(loader, CudaPrefetcher):
                yield x, y
                continue
            if isinstance(x, Mapping):  # a prefix-cache batch: {block: inputs}
                x = {k: v.to(self.device, non_blocking=True) for k, v in x.items()}
            else:
                x = x.to(self.device, non_blocking=True)
            yield x, y.to(self.device, non_blocking=True)
        signals.check()

    def train_step(self, images: Union[torch.Tensor, Mapping[int, torch.Tensor]],
                   targets: torch.Tensor) -> torch.Tensor:
        """One optimiser step on images (or a prefix-cache batch); returns the (detached) batch loss."""
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with self.autocast():
            out = self.ddp_model(images)
            loss = self.train_loss_fn(out.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update()
        return loss.detach()

    def train_one_epoch(self, loader, epoch: int) -> Dict[str, float]:
        """Train epoch ``epoch`` (0-based) on every batch of ``loader``, then step the schedule to ``epoch + 1``
        (so epoch ``e`` runs at the schedule's value at ``t = e``). Returns the mean loss, images and seconds."""
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n = 0
        start = time.perf_counter()
        for images, targets in self._batches(loader):
            loss = self.train_step(images, targets)
            loss_sum += loss.double() * targets.shape[0]
            n += targets.shape[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(n), dtype=torch.float64,
                                                                     device=self.device)]))
        total_n = int(totals[1].item())
        loss = totals[0].item() / max(total_n, 1)
        if not math.isfinite(loss):
            raise NonFiniteError(f"training diverged: the mean training loss of the epoch is {loss} "
                                     f"(lower --lr, or check the data)")
        self.scheduler.step(epoch + 1)
        return {"loss": loss, "images": total_n, "seconds": seconds}

    @torch.no_grad()
    def evaluate(self, loader) -> Dict[str, float]:
        """Top-1/top-5 (%) and mean loss over the whole split, every image counted once across ranks.
        Non-finite logits (counted on the device, checked once at the end) raise :class:`NonFiniteError`."""
        self.model.eval()
        counter = TopKCounter(self.device)
        bad = torch.zeros((), dtype=torch.float64, device=self.device)
        with self._ema_weights():
            for images, targets in self._batches(loader):
                with self.autocast():
                    out = self.model(images)
                out = out.float()
                bad += (~torch.isfinite(out)).any(dim=-1).sum()
                counter.update(out, targets, self.eval_loss_fn(out, targets))
        n_bad = int(all_reduce_sum(bad).item())
        if n_bad:
            raise NonFiniteError(f"non-finite logits (NaN or inf) for {n_bad} image(s) during evaluation: the model "
                                 f"(its weights, or --amp float16 overflow) gives no usable prediction; no result is "
                                 f"written")
        return counter.reduce()

    @contextlib.contextmanager
    def _ema_weights(self):
        if self.ema is None:
            yield
            return
        self.ema.swap()
        try:
            yield
        finally:
            self.ema.swap()

    def delta(self) -> Dict[str, torch.Tensor]:
        """The trainable tensors that are evaluated and saved (the EMA's with ``--ema``)."""
        with self._ema_weights():
            return delta_state_dict(self.model)

    def load_delta(self, delta: Dict[str, torch.Tensor], source: str) -> None:
        """Load evaluated/saved weights (with ``--ema`` into the EMA, leaving the raw weights)."""
        with self._ema_weights():
            load_delta_state_dict(self.model, delta, source=source)

    @contextlib.contextmanager
    def weights(self, delta: Optional[Dict[str, torch.Tensor]], source: str):
        """Evaluate with ``delta`` (e.g. the best validation weights) inside the block, the current ones after;
        ``None``: the current weights."""
        if delta is None:
            yield
            return
        current = self.delta()
        self.load_delta(delta, source)
        try:
            yield
        finally:
            self.load_delta(current, "last weights")

    def state_dict(self) -> Dict[str, Any]:
        return {
            "model_delta": delta_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, sd: Dict[str, Any], source: str) -> None:
        load_delta_state_dict(self.model, sd["model_delta"], source=source)
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self._load_scaler(sd.get("scaler") or {}, source)
        if self.ema is not None:
            if sd.get("ema") is None:
                raise CheckpointError(f"{source}: the checkpoint has no EMA state but --ema is on")
            self.ema.load_state_dict(sd["ema"], source)

    def _load_scaler(self, scaler_sd: Dict[str, Any], source: str) -> None:
        load_scaler_state(self.scaler, scaler_sd, self.precision, source)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
