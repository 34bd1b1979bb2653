"""Block selections as written on the command line (``"0-11"``, ``"0,2,4-6"``): parsing and formatting.

A leaf module (no torch), so that the flag parser can check ``--lora_before_blocks`` / ``--seeds`` without
importing the models.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Union

from utils.errors import ModelSettingsError

__all__ = ["BlockSpec", "parse_blocks", "format_blocks"]

BlockSpec = Union[None, str, int, Iterable[int]]


def parse_blocks(spec: BlockSpec, name: str = "blocks") -> Optional[List[int]]:
    """Parse a block selection: ``"0-11"``, ``"0,2,4-6"``, ``7``, ``[0, 1]``, ``""`` (none) or ``None`` (default).

    Ranges are inclusive at both ends, as in the original launchers (``--lora_before_blocks 0-11``).
    """
    if spec is None:
        return None
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, str):
        out: List[int] = []
        for part in spec.replace(" ", "").split(","):
            if not part:
                continue
            try:
                if "-" in part:
                    lo, hi = part.split("-")
                    lo_i, hi_i = int(lo), int(hi)
                    if hi_i < lo_i:
                        raise ValueError
                    out.extend(range(lo_i, hi_i + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise ModelSettingsError(f"{name}: cannot parse block selection {spec!r} (expected e.g. '0-11' or '0,2,4-6')") from None
        return sorted(set(out))
    return sorted(set(int(i) for i in spec))


def format_blocks(blocks: Sequence[int]) -> str:
    """Inverse of :func:`parse_blocks` for contiguous runs: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    blocks = sorted(set(blocks))
    runs: List[str] = []
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        runs.append(str(blocks[i]) if i == j else f"{blocks[i]}-{blocks[j]}")
        i = j + 1
    return ",".join(runs)
