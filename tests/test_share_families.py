"""Sharing for every supported backbone family (issue 19, part 3): a DTL model on a backbone without a ``dtl_*``
entry point of its own (DeiT III, EVA-02, a ViT without class token) round-trips through timm's ``save_for_hf``
-> ``timm.create_model("local-dir:...")`` and through a delta-only folder, with the same logits, DTL settings and
normalisation; the paper's names keep their own ``dtl_*`` architecture."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import models

VIT = dict(embed_dim=32, depth=2, num_heads=2)
SWIN = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=2)
CASES = [  # (timm name, image size, backbone arguments, architecture config.json names)
    ("deit3_small_patch16_224", 32, VIT, "dtl_timm"),
    ("vit_medium_patch16_gap_256", 32, VIT, "dtl_timm"),
    ("eva02_tiny_patch14_224", 28, VIT, "dtl_timm"),
    ("vit_small_patch14_reg4_dinov2", 28, VIT, "dtl_vit_small_patch14_reg4_dinov2"),
    ("swinv2_tiny_window8_256", 64, SWIN, "dtl_swinv2_tiny_window8_256"),
    ("vit_tiny_patch16_224", 32, VIT, "dtl_vit_tiny_patch16_224"),
]


def _model(name, size, kw):
    torch.manual_seed(0)
    m = models.create_dtl_model(name, num_classes=3, dtl=models.DTLConfig(fusion_size=3), img_size=size, **kw)
    with torch.no_grad():  # a trained-looking side network, so that equal logits mean the delta was loaded
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.mark.parametrize("name, size, kw, arch", CASES, ids=[c[0] for c in CASES])
def test_save_for_hf_and_delta_folder_round_trip(tmp_path, name, size, kw, arch):
    m = _model(name, size, kw)
    x = torch.randn(2, 3, size, size)
    want = m(x)

    timm.models.save_for_hf(m, tmp_path / "full")
    assert json.loads((tmp_path / "full" / "config.json").read_text())["architecture"] == arch
    m2 = timm.create_model(f"local-dir:{tmp_path / 'full'}", pretrained=True).eval()
    assert type(m2) is type(m) and m2.dtl_cfg == m.dtl_cfg
    assert torch.allclose(m2(x), want, atol=1e-6)
    mean = lambda model: tuple(timm.data.resolve_data_config({}, model=model)["mean"])  # noqa: E731
    assert mean(m2) == mean(m)

    models.save_delta(m, tmp_path / "delta")  # the delta only: the backbone is rebuilt (here: random, same seed)
    torch.manual_seed(0)
    m3 = models.load_delta(tmp_path / "delta").eval()
    assert type(m3) is type(m) and m3.dtl_cfg == m.dtl_cfg
    assert torch.allclose(m3(x), want, atol=1e-6)


def test_the_generic_entry_point_refuses_an_unsupported_family():
    with pytest.raises(models.ModelSettingsError, match="supported"):
        timm.create_model("dtl_timm", backbone="resnet18")
