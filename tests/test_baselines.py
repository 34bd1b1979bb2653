"""Baseline tuning methods (models/baselines.py) and the saved-tensor accounting (utils/memory.py)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import CheckpointError, ModelSettingsError, count_parameters, delta_state_dict, load_delta_state_dict
from models.baselines import (
    BASELINE_METHODS,
    baseline_methods_for,
    baseline_settings,
    create_baseline_model,
)
from models.dtl_swin import create_swin_backbone
from models.dtl_vit import create_vit_backbone
from models.trainable import is_trainable
from utils.memory import SavedTensorMeter, saved_tensor_mib

VIT = "vit_tiny_patch16_224"
VIT_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)  # 16 patches + class token
SWIN = "swin_tiny_patch4_window7_224"
SWIN_KW = dict(img_size=32, patch_size=2, window_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 2))
D, DEPTH, NCLS = 32, 2, 5



def make(method, arch="vit", seed=0, **settings):
    torch.manual_seed(seed)
    name, kw = (VIT, VIT_KW) if arch == "vit" else (SWIN, SWIN_KW)
    return create_baseline_model(method, name, NCLS, settings=settings or None, **kw)


def perturb_trainable(model, seed=1, std=0.05):
    """Move every trainable tensor off its initial value (zero heads/B/up block gradients at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def expected_trainable(method, name):
    if name.startswith("head."):
        return True
    return {
        "full": name.startswith("backbone."),
        "linear": False,
        "bitfit": name.startswith("backbone.") and name.endswith(".bias"),
        "lora": name.startswith("lora."),
        "adapter": name.startswith("adapters."),
        "adaptformer": name.startswith("adaptmlp."),
        "vpt": name == "prompts",
        "ssf": name.startswith("ssf."),
    }[method]


def one_step(model, x, y):
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}
    opt.step()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    return grads, changed


@pytest.mark.parametrize("arch,method", [("vit", m) for m in BASELINE_METHODS] + [("swin", m) for m in baseline_methods_for("swin")])
def test_one_step_trains_exactly_the_declared_tensors(arch, method):
    model = make(method, arch)
    names = [n for n, _ in model.named_parameters()]
    # the declared rule is what requires_grad says, and it is the method's rule
    for n, p in model.named_parameters():
        assert p.requires_grad == is_trainable(model, n) == expected_trainable(method, n), n
    trainable = {n for n in names if is_trainable(model, n)}
    assert trainable and any(n.startswith("head.") for n in trainable)
    perturb_trainable(model)
    x = torch.randn(3, 3, 32, 32)
    grads, changed = one_step(model, x, torch.tensor([0, 1, 4]))
    for n in names:
        if n in trainable:
            assert grads[n] is not None and grads[n].abs().max() > 0, f"{method}: {n} got no gradient"
        else:
            assert grads[n] is None, f"{method}: frozen {n} got a gradient"
    assert changed == trainable


def test_trainable_counts_match_the_published_configurations():
    d = 768  # ViT-B/16: the counts the VTAB-1k tables quote (heads excluded)
    model_kw = dict(device="meta")
    counts = {}
    for m in ("lora", "adapter", "adaptformer", "ssf", "bitfit", "vpt"):
        model = create_baseline_model(m, "vit_base_patch16_224", 100, **model_kw)
        counts[m] = count_parameters(model).trainable_excl_head
        assert count_parameters(model).head == d * 100 + 100
    assert counts["lora"] == 12 * 2 * (8 * d + d * 8) == 294_912  # NOAH's "LoRA 0.29 M"
    assert counts["adapter"] == counts["adaptformer"] == 12 * (d * 8 + 8 + 8 * d + d) == 156_768  # "0.16 M"
    assert counts["ssf"] == 2 * (d + 12 * (d + 3 * d + d + d + 4 * d + d) + d) == 205_824
    assert counts["vpt"] == 12 * 10 * d
    assert counts["bitfit"] == 102_912


def test_small_tiny_counts():
    assert count_parameters(make("lora")).trainable_excl_head == DEPTH * 2 * 2 * 8 * D
    assert count_parameters(make("lora", targets="qkv", r=2)).trainable_excl_head == DEPTH * 3 * 2 * 2 * D
    assert count_parameters(make("adapter", positions="attn,mlp")).trainable_excl_head == 2 * DEPTH * (2 * 8 * D + 8 + D)
    assert count_parameters(make("vpt", num_tokens=3)).trainable_excl_head == DEPTH * 3 * D
    assert count_parameters(make("linear")).trainable == D * NCLS + NCLS


def _features(model, x):
    return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("arch", ["vit", "swin"])
@pytest.mark.parametrize("method,settings", [
    ("full", {}), ("linear", {}), ("bitfit", {}), ("lora", {}), ("lora", {"targets": "qkv"}), ("adapter", {}),
    ("adapter", {"positions": "attn,mlp"}), ("adaptformer", {}), ("adaptformer", {"source": "norm"}),
    ("ssf", {"init_std": 0.0}),
])
def test_output_at_init_is_the_frozen_backbones(arch, method, settings):
    model = make(method, arch, **settings).eval()
    bare = (create_vit_backbone(VIT, **VIT_KW) if arch == "vit" else create_swin_backbone(SWIN, **SWIN_KW)).eval()
    bare.load_state_dict(model.backbone.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(_features(model, x), bare.forward_head(bare.forward_features(x), pre_logits=True))
        # and the injected modules are live: moving them changes the output
        perturb_trainable(model)
        if method not in ("full", "linear", "bitfit"):
            assert not torch.allclose(_features(model, x), bare.forward_head(bare.forward_features(x), pre_logits=True))


def test_methods_that_do_not_start_at_the_backbone():
    x = torch.randn(2, 3, 32, 32)
    for method in ("ssf", "vpt"):  # SSF's N(1, .02) init, VPT's extra tokens: not identities, as published
        model = make(method).eval()
        bare = create_vit_backbone(VIT, **VIT_KW).eval()
        bare.load_state_dict(model.backbone.state_dict())
        with torch.no_grad():
            assert not torch.allclose(_features(model, x), bare.forward_head(bare.forward_features(x), pre_logits=True))


def test_class_token_head_of_the_baselines():
    """ViT baselines: class token -> final norm -> head (not DTL's patch-mean pooling)."""
    model = make("linear").eval()
    perturb_trainable(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.backbone.forward_features(x)
        assert torch.allclose(model(x), model.head(tokens[:, 0]))
    for arch in ("vit", "swin"):  # trunc-normal std .02, bias 0 (timm 0.5.4's ViT and Swin)
        head = make("full", arch).head
        assert 0.015 < float(head.weight.std()) < 0.025 and float(head.weight.abs().max()) < 0.1
        assert torch.count_nonzero(head.bias) == 0


def test_vpt_prompts_are_inserted_and_replaced():
    model = make("vpt", num_tokens=3, dropout=0.0).eval()
    seen = []
    for blk in model.backbone.blocks:
        blk.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    for i, t in enumerate(seen):
        assert t.shape == (2, 1 + 3 + 16, D)
        assert torch.equal(t[:, 1:4], model.prompts[i].expand(2, -1, -1))
    with pytest.raises(ValueError, match="ViT backbones only|not implemented for swin"):
        make("vpt", "swin")


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_delta_round_trip(method):
    model = make(method)
    perturb_trainable(model)
    one_step(model, torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    delta = delta_state_dict(model)
    assert set(delta) == {n for n, _ in model.named_parameters() if is_trainable(model, n)}
    cfg = model.model_config()
    assert cfg["method"] == method and cfg["arch"] == "vit" and cfg["num_classes"] == NCLS
    # rebuild from the config (same backbone weights: same seed), load the delta
    torch.manual_seed(0)
    rebuilt = create_baseline_model(cfg["method"], VIT, cfg["num_classes"], settings=baseline_settings(cfg), **VIT_KW)
    assert rebuilt.model_config() == cfg
    load_delta_state_dict(rebuilt, delta, source="t.pth")
    x = torch.randn(2, 3, 32, 32)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    with pytest.raises(ValueError, match="t.pth.*missing keys"):
        load_delta_state_dict(rebuilt, {k: v for k, v in list(delta.items())[1:]}, source="t.pth")


def test_non_default_settings_round_trip_through_model_config():
    model = make("lora", r=4, alpha=16, targets="qkv")
    cfg = model.model_config()
    assert cfg == {"arch": "vit", "method": "lora", "num_classes": NCLS, "r": 4, "alpha": 16.0, "targets": "qkv",
                   "dropout": 0.0}
    assert make("lora", **baseline_settings(cfg)).model_config() == cfg
    assert model.lora["blocks_0_attn"].scaling == 4.0


@pytest.mark.parametrize("method", ["lora", "adaptformer", "ssf", "adapter"])
def test_deepcopy_keeps_each_copy_wired_to_its_own_modules(method):
    """Hooks are bound methods: an EMA copy must use its own injected tensors, not the live model's."""
    model = make(method).eval()
    perturb_trainable(model)
    ema = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(ema(x), ref)
        for n, p in ema.named_parameters():
            if p.requires_grad and not n.startswith("head."):
                p.mul_(3.0)
        assert not torch.allclose(ema(x), ref)
        assert torch.equal(model(x), ref)


def test_load_synthetic_timm_checkpoint_into_baseline_backbone(tmp_path):
    torch.manual_seed(3)
    src = create_vit_backbone(VIT, **VIT_KW)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["head.weight"] = torch.zeros(1000, D)  # a classifier in the file is ignored
    path = tmp_path / "vit.pth"
    torch.save({"model": sd}, path)
    for method in ("lora", "ssf", "vpt"):
        torch.manual_seed(99)
        model = create_baseline_model(method, VIT, NCLS, load_path=str(path), **VIT_KW)
        for k, v in src.state_dict().items():
            assert torch.equal(model.backbone.state_dict()[k], v), (method, k)
        assert count_parameters(model).trainable_excl_head > 0  # injected after loading, still trainable
    del sd["blocks.1.mlp.fc2.weight"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"vit\.pth.*blocks\.1\.mlp\.fc2\.weight"):
        create_baseline_model("lora", VIT, NCLS, load_path=str(path), **VIT_KW)


def test_swin_checkpoint_loads_into_a_baseline(tmp_path):
    torch.manual_seed(4)
    src = create_swin_backbone(SWIN, **SWIN_KW)
    path = tmp_path / "swin.pth"
    torch.save(src.state_dict(), path)
    model = create_baseline_model("bitfit", SWIN, NCLS, load_path=str(path), **SWIN_KW)
    for k, v in src.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    assert not any("relative_position_bias_table" in n for n, p in model.named_parameters() if p.requires_grad)


def test_bad_settings_and_methods_are_refused():
    with pytest.raises(ValueError, match="unknown baseline method 'lst'"):
        create_baseline_model("lst", VIT, NCLS, **VIT_KW)
    with pytest.raises(ValueError, match=r"unknown settings \['rank'\] for method 'lora'"):
        make("lora", rank=4)
    with pytest.raises(ValueError, match="subset of 'qkv'"):
        make("lora", targets="qx")
    with pytest.raises(ValueError, match="adapter positions"):
        make("adapter", positions="ffn")
    with pytest.raises(ValueError, match="AdaptFormer source"):
        make("adaptformer", source="y")
    with pytest.raises(ValueError, match="unsupported backbone"):
        create_baseline_model("full", "resnet50", NCLS)


def test_fused_and_explicit_attention_agree_with_injected_modules():
    model = make("lora").eval()
    perturb_trainable(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model(x)
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        assert torch.allclose(model(x), a, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# utils/memory.py
# ---------------------------------------------------------------------------------------------------------------
def test_meter_counts_a_linear_input_once_and_excludes_parameters():
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with SavedTensorMeter(lin) as meter:
        lin(x)
        lin(x)  # same input again: one storage
    assert meter.count == 1 and meter.nbytes == x.untyped_storage().nbytes() == 4 * 16 * 4
    # frozen weight, input requiring grad: the linear keeps only its weight -> nothing counted
    lin.requires_grad_(False)
    xg = torch.randn(4, 16, requires_grad=True)
    with SavedTensorMeter(lin) as meter:
        lin(xg)
    assert meter.nbytes == 0 and meter.n_excluded >= 1
    # a view is charged its whole storage
    lin.requires_grad_(True)
    big = torch.randn(10, 16)
    with SavedTensorMeter(lin) as meter:
        lin(big[:2])
    assert meter.nbytes == big.untyped_storage().nbytes()
    # nothing that needs no gradient is saved
    lin.requires_grad_(False)
    with SavedTensorMeter(lin) as meter:
        lin(x)
    assert meter.nbytes == 0 and meter.n_saved == 0


def test_saved_mib_of_a_linear_probe_is_the_final_norm_output():
    """Frozen ViT + trainable head: the only tensor kept is the final norm's output (the head's input)."""
    model = make("linear")
    x = torch.randn(3, 3, 32, 32)
    assert saved_tensor_mib(model, x) * 2 ** 20 == pytest.approx(3 * 17 * D * 4)
    # DTL keeps much less than full fine-tuning
    full = saved_tensor_mib(make("full"), x)
    assert full > saved_tensor_mib(make("lora"), x) > saved_tensor_mib(model, x)


# the families beyond the paper's (models/families.py): every baseline each one declares trains exactly its tensors
_FAMILY_CASES = [
    ("vit_medium_patch16_gap_256", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    ("eva02_tiny_patch14_224", dict(img_size=28, embed_dim=32, depth=2, num_heads=2), 28),
    ("swinv2_tiny_window8_256", dict(img_size=32, patch_size=2, window_size=2, embed_dim=16, depths=(1, 1),
                                     num_heads=(1, 2)), 32),
]


def _family_methods():
    from models.families import family_of_name

    out = []
    for name, kw, size in _FAMILY_CASES:
        methods = family_of_name(name).baselines
        out += [(name, kw, size, m) for m in methods if not (m == "vpt" and "gap" in name)]
    return out


@pytest.mark.parametrize("name,kw,size,method", _family_methods(),
                         ids=[f"{n.split('_')[0]}-{m}" for n, _, _, m in _family_methods()])
def test_family_baselines_train_exactly_the_declared_tensors(name, kw, size, method):
    torch.manual_seed(0)
    model = create_baseline_model(method, name, NCLS, **kw)
    for n, p in model.named_parameters():
        assert p.requires_grad == is_trainable(model, n) == expected_trainable(method, n), n
    trainable = {n for n, _ in model.named_parameters() if is_trainable(model, n)}
    perturb_trainable(model)
    grads, changed = one_step(model, torch.randn(3, 3, size, size), torch.tensor([0, 1, 4]))
    for n, g in grads.items():
        assert (g is not None) if n in trainable else g is None, n  # (a few bias gradients are ~0 on tiny models)
    assert changed <= trainable and any(n.startswith("head.") for n in changed)


def test_unsupported_family_baselines_are_refused():
    with pytest.raises(ModelSettingsError, match="--method lora is not implemented for eva backbones"):
        create_baseline_model("lora", "eva02_tiny_patch14_224", NCLS, img_size=28, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(ModelSettingsError, match="class token"):
        create_baseline_model("vpt", "vit_medium_patch16_gap_256", NCLS, **_FAMILY_CASES[0][1])
