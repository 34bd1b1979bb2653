"""The Compact Side Network (CSN) of DTL, shared by the ViT and Swin wrappers.

The CSN reads the *input* ``x_i`` of selected backbone blocks through low-rank maps
``g_i(x) = x A_i^T B_i^T``, accumulates their sum ``s`` and, after selected later blocks, adds
``phi(swish_beta(s))`` to the block output.  ``phi`` is the identity (DTL) or one depthwise
convolution over the token grid (DTL+).

This module knows nothing about a particular backbone: a wrapper calls :meth:`CompactSideNetwork.tap`
before a block runs and :meth:`CompactSideNetwork.inject` after it, and tells ``inject`` how to see
its tokens as a ``B x C x H x W`` grid (see :class:`DepthwiseFusion`).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LowRankTap", "DepthwiseFusion", "CompactSideNetwork", "swish", "used_taps"]


def swish(s: torch.Tensor, beta: float) -> torch.Tensor:
    """The gate of the side path: ``s * sigmoid(beta * s)``."""
    return s * torch.sigmoid(beta * s)


class LowRankTap(nn.Module):
    """``g(x) = x A^T B^T`` with ``A in R^{r x d}`` (Kaiming-uniform) and ``B in R^{d x r}`` (zeros).

    ``B = 0`` makes the whole side path add exactly zero at initialisation.
    """

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, dim))
        self.lora_B = nn.Parameter(torch.zeros(dim, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default for weights
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    def extra_repr(self) -> str:
        return f"dim={self.lora_A.shape[1]}, rank={self.lora_A.shape[0]}"


class DepthwiseFusion(nn.Module):
    """DTL+'s ``phi``: one ``k x k`` depthwise convolution over the token grid, no bias.

    Reproduces PyTorch's ``padding='same'`` (for even ``k`` the extra row/column of padding goes to the
    right/bottom).  Tokens come as ``B x N x C`` (``prefix`` leading tokens such as a class token pass
    through unchanged, the rest form a ``grid`` of ``H x W``) or as ``B x H x W x C`` (Swin's NHWC).
    """

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"fusion kernel size must be >= 1, got {kernel_size}")
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding="same", groups=dim, bias=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def forward(self, x: torch.Tensor, grid: Optional[Sequence[int]] = None, prefix: int = 0) -> torch.Tensor:
        if x.ndim == 4:  # B x H x W x C
            return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if grid is None:
            raise ValueError("DepthwiseFusion on B x N x C tokens needs the patch grid (H, W)")
        b, n, c = x.shape
        h, w = grid
        if n - prefix != h * w:
            raise ValueError(f"{n - prefix} patch tokens do not form a {h} x {w} grid")
        patches = x[:, prefix:].transpose(1, 2).reshape(b, c, h, w)
        patches = self.conv(patches).flatten(2).transpose(1, 2)
        if prefix == 0:
            return patches
        return torch.cat([x[:, :prefix], patches], dim=1)


def used_taps(csn_blocks: Iterable[int], add_back_blocks: Iterable[int]) -> list:
    """The taps that can reach an add-back block: those at or before the last add-back block.

    A tap after the last add-back block only feeds a sum that is never added back, so it can never
    receive a gradient; DTL creates no tensor for it.
    """
    add_back = list(add_back_blocks)
    if not add_back:
        return []
    last = max(add_back)
    return sorted(i for i in set(csn_blocks) if i <= last)


class CompactSideNetwork(nn.Module):
    """Low-rank taps + swish gate (+ optional depthwise fusion) over one run of same-width blocks.

    ViT has one CSN over all blocks; Swin has one per stage (the side sum restarts at every stage).
    Block indices are global backbone indices; ``taps`` is keyed by ``str(index)``.
    """

    def __init__(
        self,
        dim: int,
        rank: int,
        csn_blocks: Iterable[int],
        add_back_blocks: Iterable[int],
        beta: float = 100.0,
        fusion_size: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.beta = float(beta)
        self.add_back_blocks = frozenset(add_back_blocks)
        self.taps = nn.ModuleDict({str(i): LowRankTap(dim, rank) for i in used_taps(csn_blocks, self.add_back_blocks)})
        self.fusion = DepthwiseFusion(dim, fusion_size) if fusion_size and self.add_back_blocks else None

    def has_tap(self, index: int) -> bool:
        return str(index) in self.taps

    def tap(self, s: Optional[torch.Tensor], index: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Add ``g_index(x)`` to the running side sum ``s`` (``None`` stands for zero)."""
        key = str(index)
        if key not in self.taps:
            return s
        g = self.taps[key](x)
        return g if s is None else s + g

    def inject(
        self,
        x: torch.Tensor,
        s: Optional[torch.Tensor],
        index: int,
        grid: Optional[Sequence[int]] = None,
        prefix: int = 0,
    ) -> torch.Tensor:
        """After block ``index``: return ``x + phi(swish(s))`` if it is an add-back block, else ``x``."""
        if index not in self.add_back_blocks or s is None:
            return x
        side = swish(s, self.beta)
        if self.fusion is not None:
            side = self.fusion(side, grid=grid, prefix=prefix)
        return x + side

    def extra_repr(self) -> str:
        blocks = sorted(self.add_back_blocks)
        return f"dim={self.dim}, beta={self.beta}, add_back_blocks={blocks}"
