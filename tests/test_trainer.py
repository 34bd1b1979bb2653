"""engine.trainer.Trainer on its own: a tiny model, an OptimSpec, float32 on the CPU."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from engine.spec import OptimSpec
from engine.trainer import Trainer
from utils.distributed import DistInfo


class Tiny(nn.Module):
    """A frozen 'backbone' and a trainable head (the trainable rule of the project's models)."""

    trainable_prefixes = ("head.",)

    def __init__(self, n_in: int = 6, n_classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(n_in, n_in)
        self.head = nn.Linear(n_in, n_classes)
        self.body.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def _loader(n: int = 48, batch: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _trainer(**optim) -> Trainer:
    torch.manual_seed(0)
    spec = OptimSpec(**{"lr": 0.05, "weight_decay": 0.0, "epochs": 4, "warmup_epochs": 0, "batch_size": 8,
                        **optim})
    return Trainer(Tiny(), spec, "fp32", DistInfo(device=torch.device("cpu")), num_classes=3)


def test_training_lowers_the_loss_and_touches_only_trainable_tensors():
    trainer = _trainer()
    body = trainer.model.body.weight.detach().clone()
    losses = [trainer.train_one_epoch(_loader(), epoch)["loss"] for epoch in range(4)]
    assert losses[-1] < losses[0]
    assert torch.equal(trainer.model.body.weight, body)
    stats = trainer.train_one_epoch(_loader(), 4)
    assert stats["images"] == 48 and stats["seconds"] >= 0


def test_lr_follows_the_warmup_cosine_schedule():
    trainer = _trainer(lr=1e-2, epochs=4, warmup_epochs=2, warmup_lr=1e-4, min_lr=1e-6)
    seen = []
    for epoch in range(6):
        seen.append(trainer.lr())
        trainer.train_one_epoch(_loader(n=8), epoch)

    def expected(t: int) -> float:  # timm's warm-up, then the cosine over t (not shifted by the warm-up)
        if t < 2:
            return 1e-4 + t * (1e-2 - 1e-4) / 2
        if t >= 4:
            return 1e-6
        return 1e-6 + 0.5 * (1e-2 - 1e-6) * (1 + math.cos(math.pi * t / 4))

    assert seen == pytest.approx([expected(t) for t in range(6)], rel=1e-9)
    assert seen[4:] == pytest.approx([1e-6, 1e-6])  # the last warmup_epochs run at min_lr


def test_state_dict_round_trip_continues_identically():
    a = _trainer(ema=True, ema_decay=0.5)
    a.train_one_epoch(_loader(), 0)
    buf = io.BytesIO()  # through a file, as last.pth (the live optimiser state must not be shared)
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = _trainer(ema=True, ema_decay=0.5)
    b.load_state_dict(torch.load(buf, weights_only=False), "memory")
    for t in (a, b):
        t.train_one_epoch(_loader(seed=1), 1)
    for k, v in a.delta().items():
        assert torch.equal(v, b.delta()[k]), k
    assert a.lr() == b.lr()


def test_evaluate_counts_every_image_and_matches_a_direct_computation():
    trainer = _trainer()
    loader = _loader(n=21, batch=8)  # an incomplete last batch
    res = trainer.evaluate(loader)
    x, y = loader.dataset.tensors
    with torch.no_grad():
        pred = trainer.model(x).argmax(-1)
    assert res["n"] == 21
    assert res["top1"] == pytest.approx(100.0 * (pred == y).sum().item() / 21)


def test_precision_must_be_known_and_bf16_autocasts():
    with pytest.raises(ValueError, match="precision must be one of"):
        Trainer(Tiny(), OptimSpec(), "fp8", DistInfo(device=torch.device("cpu")), 3)
    bf = Trainer(Tiny(), OptimSpec(amp=True, amp_dtype="bfloat16"), "bf16", DistInfo(device=torch.device("cpu")), 3)
    assert bf.autocast_dtype == torch.bfloat16 and not bf.scaler.is_enabled()
    assert _trainer().autocast_dtype is None
