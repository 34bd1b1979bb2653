"""Lean mode: DTL training that keeps almost nothing for backward but the side taps' inputs.

In DTL only the side network and the head train; every backbone block is frozen.  The default forward
(the original's) still keeps, for every block after the first add-back block, everything autograd needs to
send the gradient *through* that block to the earlier taps (layer-norm inputs, the attention's q/k/v and
output, the MLP's hidden activation: about ten block-input sizes per block), and for every add-back block
the side sum ``s`` and its ``sigmoid(beta * s)``.  Nothing inside a frozen block trains, so all of it can be
recomputed in backward from the block's input instead -- which the side tap of that block keeps anyway.

:func:`lean_block` replaces the three lines of a wrapper's block loop::

    s = side.tap(s, i, x); x = block(x); x = side.inject(x, s, i, grid=grid, prefix=prefix)

with ``x = lean_block(block, x, side, state, i, grid=grid, prefix=prefix)``, where ``state`` is a
:class:`LowRankSideSum` (one per run of blocks sharing a side sum: one for ViT, one per stage for Swin).
What is kept for backward then:

- per tap before the first add-back block: its input ``x_i`` (needed for the gradient of ``A_i``; under
  autocast the low-precision copy the linear map keeps) and the rank-``r`` product ``h_i = A_i x_i``
  (``r / d`` of a block input);
- per block whose input depends on a trainable tensor (the *tail*): only its input ``x_i``, once -- the tap,
  the block and the side output run inside one :func:`torch.utils.checkpoint.checkpoint`
  (``use_reentrant=False``, ``preserve_rng_state=True``, so drop-path masks are recomputed identically), so the
  tap's use of ``x_i`` is recomputed too instead of being a second copy;
- per add-back block: nothing else -- the side sum is kept as its low-rank factors ``h_j`` (plus an optional
  dense ``base``, e.g. the sum over a cached prefix) and ``s``, the gate and DTL+'s convolution are recomputed
  in backward inside the same checkpoint.

For ViT-B/16 with the default blocks (taps 0-11, add-back 6-11) this is 12 block inputs (7 prefix tap inputs
and the inputs of blocks 7-11), against 69 for the default path: 55 MiB instead of 319 MiB at batch 8 (fp32).
The price is one extra forward of the tail blocks in backward.  The forward values are bit-identical to the
default path (same operations in the same order); gradients differ only by floating-point summation order
(the gradient of each ``B_j`` is summed per add-back block instead of once through the running sum).
"""
from __future__ import annotations

from functools import partial
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .side_network import CompactSideNetwork, swish

__all__ = ["LowRankSideSum", "lean_block", "lean_run", "lean_call", "side_output", "materialize_side_sum"]


class LowRankSideSum:
    """The running side sum ``s = base + sum_j B_j (A_j x_j)``, kept as its factors ``h_j = A_j x_j``.

    Args:
        side: the side network whose taps produce the terms.
        base: an already dense part of the sum (``None`` = zero), e.g. the sum of the taps over a cached prefix.

    The dense sum is never stored; :func:`materialize_side_sum` rebuilds it, adding the terms in the same
    order as :meth:`CompactSideNetwork.tap` does, so the values are bit-identical to the default path.
    """

    def __init__(self, side: CompactSideNetwork, base: Optional[torch.Tensor] = None) -> None:
        self.side = side
        self.base = base
        self.keys: List[str] = []
        self.hs: List[torch.Tensor] = []

    def tap(self, index: int, x: torch.Tensor) -> "LowRankSideSum":
        """Add the term of tap ``index`` (if the side network has one) for block input ``x``."""
        key = str(index)
        if key in self.side.taps:
            self.keys.append(key)
            self.hs.append(F.linear(x, self.side.taps[key].lora_A))
        return self

    @property
    def is_zero(self) -> bool:
        return self.base is None and not self.hs

    def snapshot(self) -> Tuple[Tuple[str, ...], Optional[torch.Tensor], Tuple[torch.Tensor, ...]]:
        """``(keys, base, hs)`` as they are now (the sum keeps growing after an add-back block)."""
        return tuple(self.keys), self.base, tuple(self.hs)

    def dense(self) -> Optional[torch.Tensor]:
        """The dense sum now (``None`` if zero)."""
        keys, base, hs = self.snapshot()
        return materialize_side_sum(self.side, keys, base, *hs)


def materialize_side_sum(
    side: CompactSideNetwork, keys: Sequence[str], base: Optional[torch.Tensor], *hs: torch.Tensor
) -> Optional[torch.Tensor]:
    """``base + sum_j F.linear(h_j, B_j)`` in tap order (``None`` when empty)."""
    s = base
    for key, h in zip(keys, hs):
        g = F.linear(h, side.taps[key].lora_B)
        s = g if s is None else s + g
    return s


def side_output(
    side: CompactSideNetwork,
    keys: Sequence[str],
    grid: Optional[Sequence[int]],
    prefix: int,
    base: Optional[torch.Tensor],
    *hs: torch.Tensor,
) -> torch.Tensor:
    """``phi(swish_beta(s))`` for the side sum given by its factors (what an add-back block adds)."""
    s = materialize_side_sum(side, keys, base, *hs)
    out = swish(s, side.beta)
    if side.fusion is not None:
        out = side.fusion(out, grid=grid, prefix=prefix)
    return out


def _tap_block_side(
    block: nn.Module,
    side: Optional[CompactSideNetwork],
    key: Optional[str],
    keys: Sequence[str],
    grid: Optional[Sequence[int]],
    prefix: int,
    inject: bool,
    x: torch.Tensor,
    base: Optional[torch.Tensor],
    *hs: torch.Tensor,
):
    """Tap ``key`` (if any) on ``x``, run ``block``, add the side output back (if ``inject``).

    Returns the block output, and the tap's ``h = A x`` when there is a tap.
    """
    h = None
    if key is not None:
        h = F.linear(x, side.taps[key].lora_A)
        keys, hs = (*keys, key), (*hs, h)
    y = block(x)
    if inject:
        y = y + side_output(side, keys, grid, prefix, base, *hs)
    return y if h is None else (y, h)


def _checkpoint(fn, *args: Optional[torch.Tensor]):
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)


def lean_block(
    block: nn.Module,
    x: torch.Tensor,
    side: Optional[CompactSideNetwork],
    state: Optional[LowRankSideSum],
    index: int,
    grid: Optional[Sequence[int]] = None,
    prefix: int = 0,
) -> torch.Tensor:
    """Tap before, run and add back after block ``index`` (global index), storing only what backward needs.

    ``state`` is updated in place with the tap of ``index``. ``side``/``state`` may be ``None`` for a run of
    blocks without a side network (the block is then only checkpointed). ``grid``/``prefix`` describe the
    tokens for DTL+'s convolution as in :meth:`CompactSideNetwork.inject`.
    """
    key: Optional[str] = None
    inject = False
    if side is not None:
        if state is None:
            raise ValueError("lean_block: a side network needs a LowRankSideSum state")
        key = str(index) if str(index) in side.taps else None
        inject = index in side.add_back_blocks and (key is not None or not state.is_zero)
    if side is not None and torch.is_grad_enabled() and x.requires_grad:
        # The block's input carries gradient: tap, block and side output all run inside one checkpoint, which
        # keeps only x (in its own dtype: under autocast the tap's low-precision copy of x is recomputed too).
        keys, base, hs = state.snapshot()
        out = _checkpoint(partial(_tap_block_side, block, side, key, keys, grid, prefix, inject), x, base, *hs)
        if key is None:
            return out
        y, h = out
        state.keys.append(key)
        state.hs.append(h)
        return y
    if side is None:
        if torch.is_grad_enabled() and x.requires_grad:
            return _checkpoint(block, x)
        return block(x)
    # Input without gradient: the tap keeps x (it needs it for A's gradient); the frozen block keeps nothing.
    if key is not None:
        state.tap(index, x)
    keys, base, hs = state.snapshot()
    y = block(x)
    if inject:
        out = partial(side_output, side, keys, grid, prefix)
        y = y + (_checkpoint(out, base, *hs) if torch.is_grad_enabled() else out(base, *hs))
    return y


def lean_run(
    blocks: Sequence[nn.Module],
    indices: Sequence[int],
    x: torch.Tensor,
    side: Optional[CompactSideNetwork],
    s: "None | torch.Tensor | LowRankSideSum" = None,
    grid: Optional[Sequence[int]] = None,
    prefix: int = 0,
) -> torch.Tensor:
    """Lean version of a wrapper's loop over ``blocks`` (global indices ``indices``) sharing one side sum.

    ``s`` is the side sum accumulated before the first of them: ``None``, a dense tensor (e.g. from a cached
    prefix) or a :class:`LowRankSideSum`. ViT: ``lean_run(bb.blocks[start:], range(start, depth), x, side, s,
    grid, n_prefix_tokens)``; a Swin stage: ``lean_run(stage.blocks[start - first:], range(start, end), x,
    side_or_None, s)``.
    """
    state = None
    if side is not None:
        state = s if isinstance(s, LowRankSideSum) else LowRankSideSum(side, base=s)
    for block, i in zip(blocks, indices):
        x = lean_block(block, x, side, state, i, grid=grid, prefix=prefix)
    return x


def lean_call(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for a frozen function (e.g. Swin's patch merging), recomputed in backward when ``x`` needs
    a gradient (only ``x`` is kept)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _checkpoint(fn, x)
    return fn(x)
