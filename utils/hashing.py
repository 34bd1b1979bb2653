"""SHA-256 helpers shared by the checksums and fingerprints: a file's bytes, and a tensor fed into a hash."""
from __future__ import annotations

import hashlib

import torch

__all__ = ["file_sha256", "hash_tensor"]


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tensor(h: "hashlib._Hash", label: str, t: torch.Tensor) -> None:
    """Feed ``label|dtype|shape`` and the tensor's bytes (on the CPU, contiguous) into ``h``."""
    t = t.detach()
    t = (t.cpu() if t.device.type != "cpu" else t).contiguous()
    h.update(f"{label}|{t.dtype}|{tuple(t.shape)}\n".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
