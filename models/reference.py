"""Compare this implementation with outputs of the original DTL code (the reference fixtures).

A fixture folder holds ``meta.json`` (architecture + DTL settings in neutral terms), the original model's
``reference_state_dict.pt`` (original key layout) and ``io.pt`` (input, labels, logits, logits with the side
path off, loss, gradients of the trainable tensors). :func:`check_fixture` rebuilds the model here, loads the
weights through :mod:`models.convert`, and measures every difference.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import SwinTransformer, VisionTransformer

from .config import DTLConfig
from .convert import convert_original_state_dict
from .dtl_swin import DTLSwinTransformer
from .dtl_vit import DTLVisionTransformer
from .trainable import count_parameters

__all__ = ["FixtureResult", "model_from_fixture_config", "vit_from_fixture_config", "swin_from_fixture_config",
           "check_fixture", "LOGIT_TOL", "GRAD_RTOL"]

LOGIT_TOL = 1e-5  # absolute, on logits and loss (docs/method.md, section 6)
GRAD_RTOL = 1e-4  # relative to the largest reference gradient entry of each tensor


def _dtl_config(c: Mapping[str, Any]) -> DTLConfig:
    return DTLConfig(
        r=c["r"], beta=c["beta"], fusion_size=c["fusion_size"],
        csn_blocks=c["csn_blocks"], add_back_blocks=c["add_back_blocks"],
    )


def vit_from_fixture_config(c: Mapping[str, Any]) -> DTLVisionTransformer:
    """Build the model a ViT fixture's ``meta.json['config']`` describes (random weights)."""
    backbone = VisionTransformer(
        img_size=c["img_size"], patch_size=c["patch_size"], embed_dim=c["embed_dim"], depth=c["depth"],
        num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"], qkv_bias=c["qkv_bias"],
        norm_layer=partial(nn.LayerNorm, eps=c["layer_norm_eps"]), num_classes=0, global_pool="token",
        drop_path_rate=c.get("drop_path_rate", 0.0),
    )
    return DTLVisionTransformer(backbone, c["num_classes"], _dtl_config(c))


_FIXTURE_KEYS = (
    "img_size", "patch_size", "window_size", "embed_dim", "depths", "num_heads", "mlp_ratio", "qkv_bias",
    "layer_norm_eps", "num_classes", "r", "beta", "fusion_size", "csn_blocks", "add_back_blocks",
)


def swin_from_fixture_config(config: Mapping[str, Any]) -> DTLSwinTransformer:
    """Build the model a Swin fixture's ``meta.json['config']`` describes (random weights)."""
    if config.get("arch", DTLSwinTransformer.arch) != DTLSwinTransformer.arch:
        raise ValueError(f"not a Swin fixture config (arch={config.get('arch')!r})")
    missing = [k for k in _FIXTURE_KEYS if k not in config]
    if missing:
        raise KeyError(f"Swin fixture config lacks {missing}")
    c = config
    backbone = SwinTransformer(
        img_size=c["img_size"],
        patch_size=c["patch_size"],
        window_size=c["window_size"],
        embed_dim=c["embed_dim"],
        depths=tuple(c["depths"]),
        num_heads=tuple(c["num_heads"]),
        mlp_ratio=c["mlp_ratio"],
        qkv_bias=c["qkv_bias"],
        norm_layer=partial(nn.LayerNorm, eps=c["layer_norm_eps"]),
        drop_path_rate=c.get("drop_path_rate", 0.0),
        num_classes=0,
    )
    return DTLSwinTransformer(backbone, c["num_classes"], _dtl_config(c))


def model_from_fixture_config(c: Dict[str, Any]) -> nn.Module:
    """Build the model a fixture's ``meta.json['config']`` describes (random weights)."""
    build = _FIXTURE_BUILDERS.get(c["arch"])
    if build is None:
        raise ValueError(f"unsupported fixture architecture {c['arch']!r}")
    return build(c)


#: the fixtures' ``config['arch']`` (the wrapper's family name) -> the builder of its model
_FIXTURE_BUILDERS = {DTLVisionTransformer.arch: vit_from_fixture_config, DTLSwinTransformer.arch: swin_from_fixture_config}


@dataclass
class FixtureResult:
    name: str
    logits_diff: float = float("nan")
    side_off_diff: float = float("nan")
    loss_diff: float = float("nan")
    grad_rel_diff: float = float("nan")
    n_trainable: int = -1
    n_expected: int = -1
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        status = "PASS" if self.ok else "FAIL"
        s = (f"{status} {self.name}: logits {self.logits_diff:.2e}, side-off {self.side_off_diff:.2e}, "
             f"loss {self.loss_diff:.2e}, grads(rel) {self.grad_rel_diff:.2e}, "
             f"trainable {self.n_trainable} (expected {self.n_expected})")
        return s + ("" if self.ok else " | " + "; ".join(self.problems))


def check_fixture(folder: str) -> FixtureResult:
    """Rebuild, load and run one fixture; every measured difference and problem goes into the result."""
    res = FixtureResult(os.path.basename(os.path.normpath(folder)))
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    model = model_from_fixture_config(meta["config"])
    ref_sd = torch.load(os.path.join(folder, "reference_state_dict.pt"), map_location="cpu", weights_only=True)
    io = torch.load(os.path.join(folder, "io.pt"), map_location="cpu", weights_only=True)

    sd = convert_original_state_dict(ref_sd, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(("relative_position_index", "attn_mask"))]
    if missing:
        res.problems.append(f"keys not provided by the reference: {missing[:8]}")
    if unexpected:
        res.problems.append(f"reference keys with no place here: {unexpected[:8]}")

    counts = count_parameters(model)
    res.n_trainable = counts.trainable
    res.n_expected = meta["n_trainable_csn"] + meta["n_trainable_head"]
    if res.n_trainable != res.n_expected:
        res.problems.append("trainable count differs")

    model.eval()
    x, labels = io["x"].float(), io["labels"]
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    res.logits_diff = (logits.detach() - io["logits"]).abs().max().item()
    res.loss_diff = abs(loss.item() - float(io["loss"]))

    ref_grads = convert_original_state_dict(io["grads"], model)
    params = dict(model.named_parameters())
    rel = 0.0
    ours_with_grad = {n for n, p in params.items() if p.grad is not None}
    if set(ref_grads) != ours_with_grad:
        res.problems.append(
            f"tensors with gradients differ: only reference {sorted(set(ref_grads) - ours_with_grad)[:6]}, "
            f"only here {sorted(ours_with_grad - set(ref_grads))[:6]}"
        )
    for name, g_ref in ref_grads.items():
        if name not in params or params[name].grad is None:
            continue
        g = params[name].grad
        scale = g_ref.abs().max().item()
        diff = (g - g_ref).abs().max().item()
        rel = max(rel, diff / scale if scale > 0 else diff)
    res.grad_rel_diff = rel

    with torch.no_grad():
        for name, p in params.items():
            if name.endswith("lora_B"):
                p.zero_()
        res.side_off_diff = (model(x) - io["logits_side_off"]).abs().max().item()

    if not res.logits_diff <= LOGIT_TOL:
        res.problems.append(f"logits differ by {res.logits_diff:.2e} > {LOGIT_TOL}")
    if not res.side_off_diff <= LOGIT_TOL:
        res.problems.append(f"side-off logits differ by {res.side_off_diff:.2e} > {LOGIT_TOL}")
    if not res.loss_diff <= LOGIT_TOL:
        res.problems.append(f"loss differs by {res.loss_diff:.2e} > {LOGIT_TOL}")
    if not rel <= GRAD_RTOL:
        res.problems.append(f"gradients differ by {rel:.2e} (relative) > {GRAD_RTOL}")
    return res
