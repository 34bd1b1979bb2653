"""The dtl_* models as timm models (models/timm_api.py, models/hub.py): cfgs, interface, weight loading the timm
way (local files, pretrained_cfg, cache_dir on an offline hub cache), save_for_hf and delta-folder round trips,
trace / FX / export / compile. Tiny models throughout; timm's own test_models.py runs in tests/timm_models/."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import models
from helpers_hub import write_timm_weights
from models import DTLConfig, create_dtl_model
from models.npz import save_vit_npz
from models.pretrained import CheckpointError
from models.timm_api import GENERIC_ENTRY, backbone_tag_of
from models.trainable import delta_state_dict, is_trainable

VIT = "dtl_vit_tiny_patch16_224"
SWIN = "dtl_swin_tiny_patch4_window7_224"
VIT_KW = dict(img_size=32, depth=4, add_back_blocks="2-3", csn_blocks="0-3")  # 2 x 2 patches, 4 blocks
SWIN_KW = dict(img_size=64, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=2)


@pytest.fixture(autouse=True)
def _offline_and_seeded(monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    torch.manual_seed(0)


def _trained_like(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_trainable(model, n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _make(name, **kw):
    base = VIT_KW if name == VIT else SWIN_KW
    return timm.create_model(name, **{"num_classes": 5, **base, **kw})


def _x(name, n=2):
    return torch.randn(n, 3, *((32, 32) if name == VIT else (64, 64)))


def _backbone_sd(model):
    return {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}


# ----------------------------------------------------------------------------------------------- cfgs
def test_registered_cfgs_name_the_papers_backbone_weights():
    tags = set(timm.list_pretrained("dtl_*"))
    assert {"dtl_vit_base_patch16_224.orig_in21k", "dtl_swin_base_patch4_window7_224.ms_in22k"} <= tags
    # every entry point has a cfg with backbone weights, except the generic one (its backbone is an argument)
    assert set(timm.list_models("dtl_*")) - {GENERIC_ENTRY} == {n.split(".")[0] for n in tags}
    assert timm.models.get_pretrained_cfg(GENERIC_ENTRY).architecture == GENERIC_ENTRY
    cfg = timm.models.get_pretrained_cfg("dtl_vit_base_patch16_224")  # the default tag is the paper's
    assert (cfg.tag, cfg.hf_hub_id) == ("orig_in21k", "timm/vit_base_patch16_224.orig_in21k")
    assert backbone_tag_of("dtl_vit_base_patch16_224", "orig_in21k") == "vit_base_patch16_224.orig_in21k"
    cfg = timm.models.get_pretrained_cfg("dtl_swin_base_patch4_window7_224")
    assert (cfg.tag, cfg.hf_hub_id) == ("ms_in22k", "timm/swin_base_patch4_window7_224.ms_in22k")
    assert timm.get_pretrained_cfg_value("dtl_vit_base_patch16_224", "mean") == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("name", [VIT, SWIN])
def test_pretrained_cfg_describes_the_wrapper(name):
    m = _make(name, num_classes=7)
    cfg = m.pretrained_cfg
    assert m.default_cfg is cfg
    assert cfg["architecture"] == name
    sd = m.state_dict()
    assert cfg["first_conv"] + ".weight" in sd and cfg["classifier"] + ".weight" in sd
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["num_classes"] == 7 and cfg["interpolation"] == "bicubic"
    assert cfg["input_size"] == ((3, 32, 32) if name == VIT else (3, 64, 64))
    m.reset_classifier(3)
    assert m.pretrained_cfg["num_classes"] == 3
    data = timm.data.resolve_data_config({}, model=m)
    assert data["mean"] == data["std"] == (0.5, 0.5, 0.5)  # Swin too: not ImageNet's statistics


def test_create_dtl_model_gets_the_wrapper_cfg():
    """The training path (models.create_dtl_model from the original's names) gets the same cfg."""
    m = create_dtl_model("vit_base_patch16_224_in21k", 10, DTLConfig(csn_blocks="0-1", add_back_blocks="1"),
                         img_size=32, depth=2)
    assert m.pretrained_cfg["architecture"] == "dtl_vit_base_patch16_224"
    assert m.pretrained_cfg["tag"] == "orig_in21k" and m.pretrained_cfg["first_conv"] == "backbone.patch_embed.proj"


def test_timm_eval_transform_is_the_recipes():
    """timm's data pipeline from the cfg equals the VTAB evaluation transform (resize, bicubic, 0.5 / 0.5)."""
    from data.transforms import build_transform

    m = timm.create_model(SWIN, num_classes=3)
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 190, 3), dtype=np.uint8))
    ours = build_transform("vtab", False, 224)(img)
    assert torch.allclose(tf(img), ours, atol=1e-6)


# ----------------------------------------------------------------------------------------------- interface
@pytest.mark.parametrize("name", [VIT, SWIN])
def test_classifier_and_head_interface(name):
    m = _trained_like(_make(name)).eval()
    x = _x(name)
    assert m.head_hidden_size == m.num_features and m.get_classifier() is m.head
    feats = m.forward_features(x)
    pre = m.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, m.num_features)
    assert torch.allclose(m.head(pre), m(x))
    m.reset_classifier(0)  # the one-argument form keeps the pooling
    assert m.num_classes == 0 and torch.allclose(m(x), pre)
    m.reset_classifier(4, "")  # timm's two-argument form: no pooling
    assert m.global_pool == "" and m(x).shape[-1] == 4 and m(x).dim() == (3 if name == VIT else 4)
    assert all(p.requires_grad for p in m.head.parameters())
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(2, "token")
    unpooled = timm.create_model(name, num_classes=0, global_pool="", **(VIT_KW if name == VIT else SWIN_KW))
    assert unpooled(x).dim() == (3 if name == VIT else 4)


def test_no_weight_decay_and_group_matcher_cover_the_model():
    from timm.optim import create_optimizer_v2
    from timm.models import group_parameters

    for name in (VIT, SWIN):
        m = _make(name)
        nwd = m.no_weight_decay()
        assert all(n.startswith("backbone.") for n in nwd)  # frozen anyway; timm's names under the wrapper
        assert name != VIT or "backbone.pos_embed" in nwd
        for coarse in (False, True):
            groups = group_parameters(m, m.group_matcher(coarse=coarse))
            assert sorted(n for g in groups.values() for n in g) == sorted(n for n, _ in m.named_parameters())
        opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
        trained = {id(p) for g in opt.param_groups for p in g["params"]}
        assert trained == {id(p) for p in m.parameters() if p.requires_grad}
        decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        # the recipe: weight decay on every trainable tensor except the biases
        assert decayed == {id(p) for n, p in m.named_parameters() if p.requires_grad and not n.endswith(".bias")}


@pytest.mark.parametrize("name", [VIT, SWIN])
def test_grad_checkpointing_same_outputs_and_grads(name):
    m = _trained_like(_make(name, drop_path_rate=0.2)).train()
    x = _x(name)
    torch.manual_seed(3)
    ref = m(x)
    ref.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    m.set_grad_checkpointing()
    saved = []  # tensors autograd keeps outside checkpointed regions (a checkpoint keeps its own, then recomputes)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        torch.manual_seed(3)
        out = m(x)
    out.square().sum().backward()
    m.set_grad_checkpointing(False)
    n_ckpt = len(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        m(x)
    assert n_ckpt < len(saved)  # checkpointing is on: the blocks' activations are not kept
    assert torch.allclose(out, ref, atol=1e-6)
    assert set(grads) == {n for n, p in m.named_parameters() if p.grad is not None}
    for n, g in grads.items():
        assert torch.allclose(m.get_parameter(n).grad, g, rtol=1e-4, atol=1e-7), n


def test_grad_checkpointing_and_lean_are_refused_together():
    m = _make(VIT)
    m.set_grad_checkpointing()
    with pytest.raises(ValueError, match="lean"):
        m.set_lean(True)
    m.set_grad_checkpointing(False)
    m.set_lean(True)
    with pytest.raises(ValueError, match="lean"):
        m.set_grad_checkpointing()
    with pytest.raises(ValueError, match="lean"):
        timm.create_model(VIT, lean=True, **VIT_KW).set_grad_checkpointing()


def test_forward_intermediates_include_the_side_network():
    m = _trained_like(_make(VIT)).eval()
    x = _x(VIT)
    final, inter = m.forward_intermediates(x, output_fmt="NLC")
    assert torch.allclose(final, m.forward_features(x))
    assert len(inter) == 4 and torch.allclose(inter[-1], final[:, 1:])
    # the same model with the side path off (lora_B = 0): equal before the first add-back block (2), not after
    off = _make(VIT).eval()
    off.load_state_dict(m.state_dict())
    with torch.no_grad():
        for t in off.side.taps.values():
            t.lora_B.zero_()
    _, inter_off = off.forward_intermediates(x, output_fmt="NLC")
    assert torch.allclose(inter[1], inter_off[1])  # before the first add-back block: the same
    assert not torch.allclose(inter[2], inter_off[2])  # after it: the side network's addition
    nchw = m.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert [t.shape for t in nchw] == [(2, 192, 2, 2)] * 2
    assert torch.allclose(nchw[1], inter[3].reshape(2, 2, 2, 192).permute(0, 3, 1, 2))
    feats = timm.create_model(VIT, features_only=True, out_indices=(1, 3), **VIT_KW)
    feats.model.load_state_dict(m.state_dict(), strict=False)
    outs = feats.eval()(x)
    assert [tuple(o.shape) for o in outs] == [(2, 192, 2, 2)] * 2 and torch.allclose(outs[1], nchw[1])
    assert feats.feature_info.channels() == [192, 192]


def test_swin_forward_intermediates_and_features_only():
    m = _trained_like(_make(SWIN)).eval()
    x = _x(SWIN)
    final, inter = m.forward_intermediates(x)
    assert torch.allclose(final, m.forward_features(x))
    assert [tuple(t.shape) for t in inter] == [(2, 24, 16, 16), (2, 48, 8, 8), (2, 96, 4, 4), (2, 192, 2, 2)]
    assert torch.allclose(inter[-1].permute(0, 2, 3, 1), final)  # forward_features: before the final norm
    normed = m.forward_intermediates(x, norm=True, intermediates_only=True)
    assert torch.allclose(normed[-1], m.backbone.norm(final).permute(0, 3, 1, 2), atol=1e-6)
    feats = timm.create_model(SWIN, features_only=True, **SWIN_KW)
    feats.model.load_state_dict(m.state_dict(), strict=False)
    outs = feats.eval()(x)
    assert all(torch.allclose(a, b) for a, b in zip(outs, inter))
    assert feats.feature_info.reduction() == [4, 8, 16, 32]


@pytest.mark.parametrize("name", [VIT, SWIN])
def test_trace_fx_export_compile(name):
    m = _trained_like(_make(name)).eval()
    x = _x(name, 1)
    with torch.no_grad():
        ref = m(x)
        assert torch.allclose(torch.jit.trace(m, x)(x), ref, atol=1e-5)
        from torchvision.models.feature_extraction import create_feature_extractor
        from timm.models import get_notrace_functions, get_notrace_modules

        fx = create_feature_extractor(m, return_nodes=None or {"head": "out"}, tracer_kwargs=dict(
            leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions()))
        assert torch.allclose(fx(x)["out"], ref, atol=1e-5)
        exported = torch.export.export(m, (x,))
        assert torch.allclose(exported.module()(x), ref, atol=1e-5)
        compiled = torch.compile(m, backend="eager")
        assert torch.allclose(compiled(x), ref, atol=1e-5)


# ----------------------------------------------------------------------------------------------- loading
def _files(tmp_path, ref):
    """The backbone of ``ref`` as .pth / .safetensors (and, for ViT, Google's .npz)."""
    sd = {k: v.contiguous() for k, v in ref.backbone.state_dict().items()}
    out = {"pth": tmp_path / "bb.pth", "safetensors": tmp_path / "bb.safetensors"}
    torch.save(sd, out["pth"])
    save_file(sd, str(out["safetensors"]))
    if hasattr(ref.backbone, "cls_token"):
        out["npz"] = tmp_path / "bb.npz"
        save_vit_npz(ref.backbone, str(out["npz"]))
    return out


@pytest.mark.parametrize("name", [VIT, SWIN])
def test_pretrained_overlay_file_loads_the_backbone_only(name, tmp_path):
    ref = _make(name)
    files = _files(tmp_path, ref)
    expected = {k: v for k, v in ref.backbone.state_dict().items()}
    for fmt, path in files.items():
        torch.manual_seed(5)
        m = _make(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        got = m.backbone.state_dict()
        for k, v in expected.items():
            assert torch.allclose(got[k], v, atol=1e-6), (fmt, k)
        torch.manual_seed(5)
        fresh = _make(name)  # side network and head: the fresh initialisation, not from the file
        for k, v in delta_state_dict(fresh).items():
            assert torch.equal(m.state_dict()[k], v), (fmt, k)
        assert m.pretrained_cfg["architecture"] == name
    # pretrained_cfg= (a whole cfg dict naming the file) works the same way
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    cfg.update(file=str(files["safetensors"]), custom_load=False)  # as for a plain timm model
    m = _make(name, pretrained=True, pretrained_cfg=cfg)
    assert torch.equal(m.backbone.patch_embed.proj.weight, ref.backbone.patch_embed.proj.weight)


def test_pretrained_bad_files_are_clear_errors(tmp_path):
    ref = _make(VIT)
    sd = {k: v.contiguous() for k, v in ref.backbone.state_dict().items() if not k.startswith("blocks.3.")}
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"partial\.safetensors leaves backbone tensors uninitialised: blocks\.3"):
        _make(VIT, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "partial.safetensors")))
    torch.save(ref.state_dict(), tmp_path / "whole.pth")
    with pytest.raises(CheckpointError, match="whole DTL model"):
        _make(VIT, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "whole.pth")))
    with pytest.raises(CheckpointError, match="missing.pth"):
        _make(VIT, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "missing.pth")))
    swin = _make(SWIN)
    save_vit_npz(ref.backbone, str(tmp_path / "vit.npz"))
    with pytest.raises(CheckpointError, match="ViT"):
        _make(SWIN, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "vit.npz")))
    del swin


def test_pretrained_true_from_an_offline_hub_cache(tmp_path):
    """pretrained=True names the registered backbone weights and fetches them the timm way (hub, cache_dir);
    here from a local hub cache with HF_HUB_OFFLINE: same files, no network."""
    tag = backbone_tag_of(VIT, timm.models.get_pretrained_cfg(VIT).tag)
    sd = write_timm_weights(tmp_path / "cache", tag, depth=4)
    m = _make(VIT, pretrained=True, cache_dir=str(tmp_path / "cache"), in_chans=1)
    got = m.backbone.state_dict()
    assert torch.equal(got["blocks.2.attn.qkv.weight"], sd["blocks.2.attn.qkv.weight"])
    # timm adapted the first conv to one input channel (sum over the RGB kernels)
    assert torch.allclose(got["patch_embed.proj.weight"], sd["patch_embed.proj.weight"].sum(1, keepdim=True), atol=1e-6)
    assert "pos_embed" in got and got["pos_embed"].shape[1] == 1 + 4  # resampled to the 2 x 2 grid
    with pytest.raises(CheckpointError, match="timm/"):
        _make(VIT, pretrained=True, cache_dir=str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------------- sharing
@pytest.mark.parametrize("name", [VIT, SWIN])
def test_save_for_hf_local_dir_round_trip(name, tmp_path):
    m = _trained_like(_make(name, fusion_size=3)).eval()
    timm.models.save_for_hf(m, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architecture"] == name and cfg["model_args"]["fusion_size"] == 3
    m2 = timm.create_model("local-dir:" + str(tmp_path / "hf"), pretrained=True).eval()
    assert type(m2) is type(m) and m2.dtl_cfg == m.dtl_cfg
    x = _x(name)
    assert torch.equal(m2(x), m(x))


@pytest.mark.parametrize("name", [VIT, SWIN])
def test_delta_folder_round_trip(name, tmp_path):
    ref = _make(name)
    files = _files(tmp_path, ref)
    m = _trained_like(_make(name, fusion_size=3, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(files["safetensors"])))).eval()
    folder = models.save_delta(m, tmp_path / "delta", info={"dataset": "toy"})
    assert sorted(os.listdir(folder)) == ["config.json", "delta.safetensors"]
    assert os.path.getsize(os.path.join(folder, "delta.safetensors")) < 100_000
    cfg = json.loads((tmp_path / "delta" / "config.json").read_text())
    assert cfg["architecture"] == name
    assert cfg["dtl"]["model_spec"]["weights"]["kind"] == "file"  # the file it was loaded from, not the cfg's hub tag
    assert cfg["dtl"]["method"] == "dtl+" and cfg["dtl"]["dataset"] == "toy"
    x = _x(name)
    for loaded in (models.load_delta(folder, backbone_file=str(files["pth"])),
                   timm.create_model("local-dir:" + folder, pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(files["safetensors"])))):
        assert type(loaded) is type(m)
        assert torch.equal(loaded.eval()(x), m(x))
    d = models.read_delta(folder)
    assert set(d.tensors) == set(delta_state_dict(m)) and d.spec.method == "dtl+"


def test_delta_folder_backbone_from_its_tag_and_errors(tmp_path):
    """No backbone file: the backbone comes from the folder's timm tag (here an offline hub cache)."""
    tag = backbone_tag_of(VIT, timm.models.get_pretrained_cfg(VIT).tag)
    write_timm_weights(tmp_path / "cache", tag, depth=4)
    m = _trained_like(_make(VIT, pretrained=True, cache_dir=str(tmp_path / "cache"))).eval()
    folder = models.save_delta(m, tmp_path / "d")
    loaded = models.load_delta(folder, cache_dir=str(tmp_path / "cache")).eval()
    x = _x(VIT)
    assert torch.equal(loaded(x), m(x))
    with pytest.raises(CheckpointError, match="config.json"):
        models.load_delta(tmp_path)
    with pytest.raises(CheckpointError, match="nowhere.npz"):
        models.load_delta(folder, backbone_file=str(tmp_path / "nowhere.npz"))
    (tmp_path / "d" / "delta.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="delta.safetensors"):
        models.read_delta(folder)


def test_a_checkpoint_in_the_model_layout_skips_timms_converter():
    """A headless Swin state dict in timm's current layout loads as it is (timm's Swin filter before 1.0.31
    mistook it for the original layout and moved its patch merging); the original layout still converts."""
    from models.pretrained import in_model_layout

    bb = _make(SWIN).backbone
    sd = {k: v for k, v in bb.state_dict().items() if "relative_position_index" not in k and "attn_mask" not in k}
    assert in_model_layout(sd, bb)
    old = {k.replace("layers.1.downsample", "layers.0.downsample"): v for k, v in sd.items()}
    assert not in_model_layout(old, bb)
    assert not in_model_layout({}, bb)


def test_local_dir_delta_folder_uses_the_backbone_weights_it_records(tmp_path, monkeypatch, caplog):
    """timm.create_model("local-dir:<delta folder>", pretrained=True) with no backbone source of its own loads
    what the delta was trained on, as models.load_delta does, and config.json says what that is: a random
    backbone (no download: the same backbone again, from the recorded init_seed), a file (asked for, the same
    error as load_delta), timm's weights of the recorded tag (not the architecture's default tag)."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # offline (autouse) and nothing cached
    x = _x(VIT)
    torch.manual_seed(7)
    m = _trained_like(_make(VIT)).eval()  # a randomly initialised backbone
    folder = models.save_delta(m, tmp_path / "random", info={"init_seed": 7})
    pcfg = json.loads((tmp_path / "random" / "config.json").read_text())["pretrained_cfg"]
    assert pcfg["tag"] is None and "hf_hub_id" not in pcfg and "random initialisation" in pcfg["notes"][0]
    with caplog.at_level("WARNING"):
        loaded = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    assert "trained on a randomly initialised backbone and is used on one" in caplog.text
    assert torch.equal(loaded(x), m(x)) and torch.equal(loaded(x), models.load_delta(folder)(x))

    torch.save(_make(VIT).backbone.state_dict(), tmp_path / "bb.pth")
    m = _trained_like(_make(VIT, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "bb.pth"))))
    folder = models.save_delta(m, tmp_path / "file")
    pcfg = json.loads((tmp_path / "file" / "config.json").read_text())["pretrained_cfg"]
    assert pcfg["tag"] is None and "hf_hub_id" not in pcfg and "the file bb.pth" in pcfg["notes"][0]
    for load in (lambda: timm.create_model("local-dir:" + folder, pretrained=True), lambda: models.load_delta(folder)):
        with pytest.raises(CheckpointError, match=r"trained on the backbone weights file bb\.pth: give it .*"
                                                  r"pretrained_cfg_overlay=dict\(file=\.\.\.\)"):
            load()

    tag = "vit_tiny_patch16_224.augreg_in21k"  # timm's weights, not the default tag (augreg_in21k_ft_in1k)
    write_timm_weights(tmp_path / "cache", tag, depth=4)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache"))
    m = _trained_like(models.create_dtl_model(tag, 5, DTLConfig(csn_blocks="0-3", add_back_blocks="2-3"),
                                              pretrained=True, img_size=32, depth=4)).eval()
    folder = models.save_delta(m, tmp_path / "timm")
    pcfg = json.loads((tmp_path / "timm" / "config.json").read_text())["pretrained_cfg"]
    assert pcfg["tag"] == "augreg_in21k" and pcfg["hf_hub_id"] == "timm/" + tag and tag in pcfg["notes"][0]
    loaded = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    assert torch.equal(loaded(x), m(x))
