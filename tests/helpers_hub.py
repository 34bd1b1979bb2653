"""A Hugging Face Hub cache laid out on disk for tests: ``pretrained=True`` without a network.

``huggingface_hub`` resolves ``repo_id`` at revision ``main`` from ``<cache>/models--<org>--<name>/refs/main``
and reads ``snapshots/<commit>/<file>``; in offline mode (``HF_HUB_OFFLINE=1``) that is all it does. The
weights written here are a randomly initialised timm model of the repository's architecture.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_repo(cache_dir: Path, repo_id: str, state_dict: Dict[str, torch.Tensor],
                   filename: str = "model.safetensors") -> Path:
    """Write ``state_dict`` as ``filename`` of hub repository ``repo_id`` into cache ``cache_dir``."""
    from safetensors.torch import save_file

    folder = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snap = folder / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    path = snap / filename
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def write_timm_weights(cache_dir: Path, tag: str, seed: int = 0, **model_kwargs) -> Dict[str, torch.Tensor]:
    """Random weights of timm model ``tag`` (``arch.tag``) as its hub repository ``timm/<arch.tag>``; returns them."""
    import timm

    torch.manual_seed(seed)
    cfg = timm.models.get_pretrained_cfg(tag)
    model = timm.create_model(tag.split(".")[0], pretrained=False, num_classes=cfg.num_classes, **model_kwargs)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_hub_repo(cache_dir, cfg.hf_hub_id, sd)
    return sd


def hub_id(tag: str) -> Optional[str]:
    import timm

    cfg = timm.models.get_pretrained_cfg(tag)
    return cfg.hf_hub_id if cfg is not None else None
