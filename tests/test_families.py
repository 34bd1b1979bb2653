"""Every supported backbone family (models/families.py) end to end on tiny configurations (pretrained=False):
DTL and DTL+ build, forward and train one step; the side path is zero at initialisation; the normalisation
timm reports; a checkpoint of the plain timm model (its real key layout, .pth and .safetensors) loads through
the real loading path; a delta round-trips; wrapping a timm instance (get_dtl_model); refused families."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

import models
from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import TINY, run_train, vtab_root
from models import DTLConfig, ModelSettingsError, create_dtl_model, get_dtl_model
from models.families import default_normalization, family_of_name
from models.trainable import delta_state_dict, is_trainable, load_delta_state_dict

HALF = ((0.5,) * 3, (0.5,) * 3)
IMNET = (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
CLIP = (tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD))
_VIT = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2)
_SWIN = dict(img_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=4)

# (case, timm name, tiny kwargs, family, normalisation of the name's timm cfg, image size)
CASES = [
    ("vit_class_token", "vit_tiny_patch16_224", _VIT, "vit", HALF, 32),
    ("vit_gap_no_class_token", "vit_medium_patch16_gap_256", _VIT, "vit", HALF, 32),
    ("vit_reg_tokens_fc_norm", "vit_betwixt_patch16_reg4_gap_256", _VIT, "vit", HALF, 32),
    ("siglip_map_head", "vit_base_patch16_siglip_224", _VIT, "vit", HALF, 32),
    ("clip_pre_norm", "vit_base_patch16_clip_224", _VIT, "vit", CLIP, 32),
    ("deit3", "deit3_small_patch16_224", _VIT, "vit", IMNET, 32),
    ("flexivit", "flexivit_small", _VIT, "vit", HALF, 32),
    ("dinov2_reg", "vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=4, embed_dim=32, num_heads=2), "vit",
     IMNET, 28),
    ("eva02_rope", "eva02_tiny_patch14_224", dict(img_size=28, depth=4, embed_dim=32, num_heads=2), "eva", CLIP, 28),
    ("swin", "swin_tiny_patch4_window7_224", _SWIN, "swin", IMNET, 64),
    ("swinv2", "swinv2_tiny_window8_256", _SWIN, "swinv2", IMNET, 64),
]
IDS = [c[0] for c in CASES]


def _images(size, n=2, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _frozen_reference(model, x):
    """Logits of the frozen backbone (timm's own forward_intermediates) + the DTL head: what a DTL model
    computes while its side path is zero."""
    bb = model.backbone
    if model.arch in ("swin", "swinv2"):
        last = bb.forward_intermediates(x, indices=1, intermediates_only=True)[-1].permute(0, 2, 3, 1)
        return model.head(bb.norm(last).mean(dim=(1, 2)))
    patches = bb.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)[-1]
    return model.head(model.final_norm()(patches.mean(dim=1)))


def _randomise_side(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("side."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("case,name,kw,family,norm,size", CASES, ids=IDS)
@pytest.mark.parametrize("fusion", [0, 3])
def test_family_builds_trains_and_starts_as_the_frozen_backbone(case, name, kw, family, norm, size, fusion):
    assert family_of_name(name).name == family
    torch.manual_seed(0)
    m = create_dtl_model(name, 5, dtl=DTLConfig(fusion_size=fusion), **kw)
    assert m.arch == family and m.model_config()["arch"] == family
    assert type(m) is models.get_family(family).wrapper
    x = _images(size)
    m.eval()
    with torch.no_grad():
        out = m(x)
        assert out.shape == (2, 5)
        assert torch.allclose(out, _frozen_reference(m, x), atol=1e-6, rtol=0), "side path not zero at init"
    if getattr(m.backbone, "attn_pool", None) is not None:
        pytest.fail("the attention pool should have been removed")
    # one training step: every trainable tensor gets a gradient, no frozen one does
    m.train()
    _randomise_side(m)  # B = 0 at init would give A a zero (but present) gradient; make both non-trivial
    loss = torch.nn.functional.cross_entropy(m(x), torch.tensor([0, 3]))
    loss.backward()
    for n, p in m.named_parameters():
        if is_trainable(m, n):
            assert p.requires_grad and p.grad is not None and bool(p.grad.abs().sum() > 0), n
        else:
            assert not p.requires_grad and p.grad is None, n
    assert any(n.startswith("side.") for n, _ in m.named_parameters() if is_trainable(m, n))
    if fusion:
        assert any("fusion" in n for n, _ in m.named_parameters())


@pytest.mark.parametrize("case,name,kw,family,norm,size", CASES, ids=IDS)
def test_family_normalization_is_reported_to_timm(case, name, kw, family, norm, size):
    mean, std = default_normalization(name)
    assert mean == pytest.approx(norm[0]) and std == pytest.approx(norm[1])
    m = create_dtl_model(name, 3, **kw)
    cfg = timm.data.resolve_data_config({}, model=m)
    assert tuple(cfg["mean"]) == pytest.approx(norm[0]) and tuple(cfg["std"]) == pytest.approx(norm[1])
    assert tuple(m.pretrained_cfg["mean"]) == pytest.approx(norm[0])
    assert tuple(m.pretrained_cfg["std"]) == pytest.approx(norm[1])
    # a normalisation given explicitly is the one reported
    m2 = models.get_family(family).wrapper(m.backbone, 3, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert timm.data.resolve_data_config({}, model=m2)["std"] == pytest.approx((0.4, 0.5, 0.6))


def test_paper_names_keep_the_recipe_normalization():
    for name in ("vit_base_patch16_224_in21k", "swin_base_patch4_window7_224_in22k",
                 "vit_base_patch16_224.orig_in21k", "swin_base_patch4_window7_224.ms_in22k",
                 "dtl_vit_base_patch16_224", "dtl_swin_base_patch4_window7_224"):
        assert default_normalization(name) == HALF, name
    # ... and other weights of the same architecture use their own statistics
    assert default_normalization("swin_base_patch4_window7_224.ms_in22k_ft_in1k")[0] == pytest.approx(IMNET[0])
    m = create_dtl_model("swin_base_patch4_window7_224_in22k", 3, img_size=64, embed_dim=16, depths=(1, 1, 2, 1),
                         num_heads=(1, 1, 1, 1), window_size=4)
    assert timm.data.resolve_data_config({}, model=m)["mean"] == HALF[0]
    m = timm.create_model("dtl_vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    assert timm.data.resolve_data_config({}, model=m)["mean"] == HALF[0]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("case,name,kw,family,norm,size", CASES, ids=IDS)
def test_family_checkpoint_loads_and_delta_round_trips(tmp_path, case, name, kw, family, norm, size, fmt):
    torch.manual_seed(1)
    src = timm.create_model(name, **kw)  # the plain timm model, with its classifier (and attention pool)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"{case}.{fmt}"
    save_file(sd, str(path)) if fmt == "safetensors" else torch.save(sd, path)
    torch.manual_seed(2)
    m = create_dtl_model(name, 4, dtl=DTLConfig(fusion_size=3), load_path=str(path), **kw)
    own = m.backbone.state_dict()
    for k, v in own.items():
        if k in sd:
            assert torch.equal(v, sd[k]), k
    assert m.backbone.weights_record["file"] == path.name
    _randomise_side(m)
    x = _images(size)
    m.eval()
    with torch.no_grad():
        ref = m(x)
    delta = delta_state_dict(m)
    assert all(k.startswith(("side.", "head.")) for k in delta)
    torch.manual_seed(3)
    m2 = create_dtl_model(name, 4, dtl=DTLConfig(fusion_size=3), load_path=str(path), **kw).eval()
    load_delta_state_dict(m2, delta)
    with torch.no_grad():
        assert torch.equal(m2(x), ref)


@pytest.mark.parametrize("case,name,kw,family,norm,size", [c for c in CASES if c[0] in
                         ("vit_gap_no_class_token", "siglip_map_head", "eva02_rope", "swinv2", "swin")],
                         ids=["vit_gap_no_class_token", "siglip_map_head", "eva02_rope", "swin", "swinv2"])
def test_get_dtl_model_wraps_a_timm_instance(case, name, kw, family, norm, size):
    torch.manual_seed(0)
    timm_model = timm.create_model(name, num_classes=7, **kw)
    weights = {k: v.clone() for k, v in timm_model.state_dict().items() if not k.startswith(("head", "attn_pool"))}
    m = get_dtl_model(timm_model, DTLConfig(fusion_size=3))
    assert m.backbone is timm_model and m.arch == family and m.num_classes == 7
    assert all(torch.equal(m.backbone.state_dict()[k], v) for k, v in weights.items())
    assert not any(p.requires_grad for p in m.backbone.parameters())
    assert timm.data.resolve_data_config({}, model=m)["mean"] == pytest.approx(norm[0])
    x = _images(size)
    with torch.no_grad():
        assert torch.allclose(m.eval()(x), _frozen_reference(m, x), atol=1e-6, rtol=0)
    m2 = get_dtl_model(timm.create_model(name, **kw), num_classes=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert m2.num_classes == 3 and m2.pretrained_cfg["mean"] == (0.5,) * 3


def test_unsupported_families_are_refused_before_anything_is_built():
    for name in ("resnet18", "convnext_tiny", "swinv2_cr_tiny_ns_224", "vit_base_r50_s16_224"):
        with pytest.raises(ModelSettingsError, match=f"unsupported backbone '{name}'.*vit .*eva .*swin .*swinv2"):
            create_dtl_model(name, 3)
    with pytest.raises(ModelSettingsError, match="unsupported backbone ResNet: DTL supports"):
        get_dtl_model(timm.create_model("resnet18", pretrained=False))


def test_train_refuses_an_unsupported_family(tmp_path_factory, tmp_path, caplog):
    root = vtab_root(tmp_path_factory)
    argv = ["--data_dir", root, "--dataset", "cifar_100", *TINY, "--epochs", "1", "--warmup_epochs", "0",
            "--batch_size", "8", "--output_dir", str(tmp_path / "out")]
    argv[argv.index("vit_tiny_patch16_224")] = "resnet18"
    assert run_train(argv) == 2
    assert "unsupported backbone 'resnet18'" in caplog.text and "swinv2" in caplog.text


@pytest.mark.parametrize("case,name,kw,family,norm,size", [c for c in CASES if c[0] in
                         ("vit_reg_tokens_fc_norm", "eva02_rope", "swinv2")],
                         ids=["vit_reg_tokens_fc_norm", "eva02_rope", "swinv2"])
def test_family_lean_mode_and_grad_checkpointing_compute_the_same(case, name, kw, family, norm, size):
    torch.manual_seed(0)
    m = create_dtl_model(name, 3, dtl=DTLConfig(fusion_size=3), **kw)
    _randomise_side(m)
    x = _images(size)
    y = torch.tensor([0, 2])

    def grads():
        m.zero_grad()
        out = m(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    m.eval()
    ref, g_ref = grads()
    m.set_lean(True)
    out, g = grads()
    assert torch.allclose(out, ref, atol=1e-6) and g.keys() == g_ref.keys()
    assert all(torch.allclose(g[k], g_ref[k], rtol=1e-4, atol=1e-7) for k in g)
    m.set_lean(False)
    m.set_grad_checkpointing(True)
    out, g = grads()
    assert torch.allclose(out, ref, atol=1e-6)
    assert all(torch.allclose(g[k], g_ref[k], rtol=1e-4, atol=1e-7) for k in g)


@pytest.mark.parametrize("entry,kw,size,mean", [
    ("dtl_vit_base_patch16_siglip_224", _VIT, 32, HALF[0]),
    ("dtl_vit_base_patch16_clip_224", _VIT, 32, CLIP[0]),
    ("dtl_vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=2, embed_dim=32, num_heads=2), 28, IMNET[0]),
    ("dtl_eva02_base_patch14_224", dict(img_size=28, depth=2, embed_dim=32, num_heads=2), 28, CLIP[0]),
    ("dtl_swinv2_tiny_window8_256", _SWIN, 64, IMNET[0]),
])
def test_modern_entry_points(entry, kw, size, mean):
    m = timm.create_model(entry, num_classes=3, fusion_size=3, **kw)
    assert m.pretrained_cfg["architecture"] == entry and m(_images(size)).shape == (2, 3)
    assert tuple(timm.data.resolve_data_config({}, model=m)["mean"]) == pytest.approx(mean)
    assert default_normalization(entry)[0] == pytest.approx(mean)
