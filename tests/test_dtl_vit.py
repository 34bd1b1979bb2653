"""DTL / DTL+ on ViT: faithfulness to the original, the trainable rule, memory behaviour, weight loading."""
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import VisionTransformer

import models
from models import CheckpointError, DTLConfig, DTLVisionTransformer, create_dtl_model
from models.dtl_vit import create_vit_backbone
from models.npz import save_vit_npz
from models.reference import check_fixture
from models.side_network import DepthwiseFusion
from tests.conftest import FIXTURES, REPO

VIT_FIXTURES = sorted(p.name for p in FIXTURES.glob("vit_*")) if FIXTURES.is_dir() else []


def tiny_vit(img_size=32, patch_size=4, depth=4, embed_dim=32, **kw) -> VisionTransformer:
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=2,
                             num_classes=0, global_pool="token", **kw)


def tiny_dtl(fusion_size=0, **kw) -> DTLVisionTransformer:
    torch.manual_seed(0)
    dtl = DTLConfig(r=2, fusion_size=fusion_size, csn_blocks=kw.pop("csn", "0-3"), add_back_blocks=kw.pop("add", "2-3"))
    return DTLVisionTransformer(tiny_vit(**kw), num_classes=5, dtl=dtl)


def randomize_side_and_head(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(("side.", "head.")):
                p.normal_(0, 0.1)


@pytest.mark.parametrize("name", VIT_FIXTURES)
def test_reference_fixture_matches_original(fixtures_dir, name):
    res = check_fixture(str(fixtures_dir / name))
    assert res.ok, res.line()
    assert res.logits_diff <= 1e-5 and res.grad_rel_diff <= 1e-4 and res.n_trainable == res.n_expected


def test_check_reference_cli_passes_and_fails(fixtures_dir, tmp_path):
    folders = [str(fixtures_dir / n) for n in VIT_FIXTURES]
    ok = subprocess.run([sys.executable, "tools/check_reference.py", *folders], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("PASS") == len(folders)
    # A fixture whose expected logits were altered must fail.
    import shutil

    bad = tmp_path / "vit_bad"
    shutil.copytree(folders[0], bad)
    io = torch.load(bad / "io.pt", weights_only=True)
    io["logits"] = io["logits"] + 1e-3
    torch.save(io, bad / "io.pt")
    res = subprocess.run([sys.executable, "tools/check_reference.py", str(bad)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 1 and "FAIL vit_bad" in res.stdout and "logits differ" in res.stdout


@pytest.mark.parametrize("fusion_size", [0, 3, 4])
def test_side_path_is_zero_at_init(fusion_size):
    model = tiny_dtl(fusion_size).eval()
    with torch.no_grad():
        model.head.weight.normal_()
        model.head.bias.normal_()
        x = torch.randn(2, 3, 32, 32)
        bb = model.backbone
        t = bb.blocks(bb._pos_embed(bb.patch_embed(x)))
        frozen = model.head(bb.norm(t[:, bb.num_prefix_tokens:].mean(1)))
        assert torch.equal(model(x), frozen)


def test_only_side_and_head_receive_gradients():
    model = tiny_dtl(3).train()
    randomize_side_and_head(model)
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 3])).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == trainable
    assert all(n.startswith(("side.", "head.")) for n in trainable)
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable)
    assert "side.fusion.conv.weight" in trainable and "side.taps.0.lora_A" in trainable


def test_blocks_before_first_add_back_keep_no_activations():
    model = tiny_dtl(0, depth=6, csn="0-5", add="3-5").train()
    randomize_side_and_head(model)
    current = {"block": None}
    saved_in = []
    for i, blk in enumerate(model.backbone.blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: current.update(block=i))
        blk.register_forward_hook(lambda m, a, o: current.update(block=None))

    def pack(t):
        saved_in.append(current["block"])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    inside = [b for b in saved_in if b is not None]
    assert inside, "tail blocks should save activations"
    # Blocks 0-3 (up to and including the first add-back block, whose input does not depend on any trainable
    # tensor either) save nothing; the side taps keep their inputs outside the blocks.
    assert min(inside) == 4, f"blocks {sorted(set(b for b in inside if b < 4))} kept activations"


def test_taps_after_last_add_back_are_not_created():
    model = tiny_dtl(0, csn="0-3", add="1-2")
    assert sorted(model.side.taps) == ["0", "1", "2"]
    assert model.dtl_cfg.csn_blocks == [0, 1, 2, 3]


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_fusion_matches_pytorch_same_padding(k):
    torch.manual_seed(k)
    fusion = DepthwiseFusion(8, k)
    grid = (6, 4)
    tokens = torch.randn(2, 1 + 24, 8)
    out = fusion(tokens, grid=grid, prefix=1)
    img = tokens[:, 1:].transpose(1, 2).reshape(2, 8, 6, 4)
    total = k - 1
    padded = F.pad(img, (total // 2, total - total // 2, total // 2, total - total // 2))  # extra pad right/bottom
    ref = F.conv2d(padded, fusion.weight, groups=8).flatten(2).transpose(1, 2)
    assert torch.equal(out[:, :1], tokens[:, :1])
    torch.testing.assert_close(out[:, 1:], ref, rtol=0, atol=1e-6)


def test_non_square_grid_from_patch_embedding():
    model = tiny_dtl(4, img_size=(48, 32), patch_size=8).train()
    randomize_side_and_head(model)
    x = torch.randn(2, 3, 48, 32)
    assert model.patch_grid(x) == (6, 4)
    model(x).sum().backward()
    assert model.side.fusion.weight.grad is not None


def test_vit_b16_trainable_counts():
    for k, extra in [(0, 0), (3, 6912), (4, 768 * 16), (5, 768 * 25)]:
        m = create_dtl_model("vit_base_patch16_224_in21k", 100, DTLConfig(fusion_size=k))
        c = models.count_parameters(m)
        assert c.trainable_excl_head == 36864 + extra
        assert c.trainable == 36864 + extra + 76900
        assert m.dtl_cfg.csn_blocks == list(range(12)) and m.dtl_cfg.add_back_blocks == list(range(6, 12))


def test_registered_in_timm():
    names = timm.list_models("dtl_vit_*")
    assert {"dtl_vit_tiny_patch16_224", "dtl_vit_base_patch16_224"} <= set(names)
    m = timm.create_model("dtl_vit_tiny_patch16_224", num_classes=3, img_size=32, fusion_size=3, r=4)
    assert isinstance(m, DTLVisionTransformer) and m.side.taps["0"].lora_A.shape == (4, 192)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_block_selection_errors():
    with pytest.raises(ValueError, match="add_back_blocks contains \\[12\\]"):
        DTLVisionTransformer(tiny_vit(depth=12), 5, DTLConfig(add_back_blocks="6-12"))
    with pytest.raises(ValueError, match="cannot parse"):
        DTLConfig(csn_blocks="a-b")
    with pytest.raises(TypeError, match="DTLVisionTransformer wraps a timm VisionTransformer, got SwinTransformer"):
        DTLVisionTransformer(timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=2,
                                               embed_dim=16, depths=(1, 1), num_heads=(1, 1), num_classes=0), 5)


def _npz_source(tmp_path):
    torch.manual_seed(1)
    src = create_vit_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.05)
    path = tmp_path / "ViT-Ti_4.npz"
    save_vit_npz(src, str(path), head=nn.Linear(192, 21843))
    return src, path


def test_google_npz_round_trip_includes_final_norm(tmp_path):
    src, path = _npz_source(tmp_path)
    keys = set(np.load(path).files)
    assert {"Transformer/encoder_norm/scale", "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"} <= keys
    model = create_dtl_model("vit_tiny_patch16_224", 5, load_path=str(path), img_size=32, patch_size=4)
    loaded = model.backbone.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(loaded[k], v), k
    assert torch.equal(model.backbone.norm.weight, src.norm.weight)
    # the norm really is used by the DTL head
    x = torch.randn(1, 3, 32, 32)
    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    tokens = model.forward_features(x)[:, 1:].mean(1)
    torch.testing.assert_close(feats, F.layer_norm(tokens, (192,), src.norm.weight, src.norm.bias, 1e-6))


def test_timm_pth_checkpoint_loads(tmp_path):
    torch.manual_seed(2)
    src = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10)
    path = tmp_path / "vit.pth"
    torch.save({"model": src.state_dict()}, path)
    model = create_dtl_model("vit_tiny_patch16_224", 5, load_path=str(path), img_size=32, patch_size=4)
    assert torch.equal(model.backbone.blocks[3].mlp.fc2.weight, src.blocks[3].mlp.fc2.weight)
    assert torch.equal(model.backbone.norm.bias, src.norm.bias)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    build = partial(create_dtl_model, "vit_tiny_patch16_224", 5, img_size=32, patch_size=4)
    with pytest.raises(CheckpointError, match="not found: .*nope.npz"):
        build(load_path=str(tmp_path / "nope.npz"))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="garbage.npz"):
        build(load_path=str(garbage))
    garbage_pth = tmp_path / "garbage.pth"
    garbage_pth.write_bytes(b"\x00\x01junk")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*garbage.pth"):
        build(load_path=str(garbage_pth))
    # npz lacking a block tensor: the error names the file and the key
    src, path = _npz_source(tmp_path)
    arrays = dict(np.load(path))
    del arrays["Transformer/encoderblock_2/LayerNorm_0/scale"]
    short = tmp_path / "short.npz"
    np.savez(short, **arrays)
    with pytest.raises(CheckpointError, match="short.npz.*encoderblock_2/LayerNorm_0/scale"):
        build(load_path=str(short))
    # pth lacking a tensor: named as uninitialised
    sd = src.state_dict()
    del sd["blocks.1.attn.proj.weight"]
    partial_pth = tmp_path / "partial.pth"
    torch.save(sd, partial_pth)
    with pytest.raises(CheckpointError, match="partial.pth leaves backbone tensors uninitialised: blocks.1.attn.proj.weight"):
        build(load_path=str(partial_pth))
    # a checkpoint of another size
    other = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, num_classes=0)
    wrong = tmp_path / "wrong.pth"
    torch.save(other.state_dict(), wrong)
    with pytest.raises(CheckpointError, match="wrong.pth"):
        build(load_path=str(wrong))


def test_delta_round_trip_and_errors():
    a, b = tiny_dtl(3), tiny_dtl(3)
    randomize_side_and_head(a)
    delta = models.delta_state_dict(a)
    assert set(delta) == {n for n, p in a.named_parameters() if p.requires_grad}
    models.load_delta_state_dict(b, delta)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(a.eval()(x), b.eval()(x))
    del delta["side.taps.1.lora_B"]
    with pytest.raises(ValueError, match="run.pth.*missing keys \\['side.taps.1.lora_B'\\]"):
        models.load_delta_state_dict(b, delta, source="run.pth")
    with pytest.raises(ValueError, match="shape mismatch: head.bias: checkpoint \\(5,\\) vs model \\(7,\\)"):
        models.load_delta_state_dict(DTLVisionTransformer(tiny_vit(), 7, DTLConfig(fusion_size=3, csn_blocks="0-3", add_back_blocks="2-3")),
                                     models.delta_state_dict(a))


def test_trainable_report_lists_counts():
    report = models.trainable_report(tiny_dtl(3))
    assert "side.fusion.conv.weight" in report and "without head" in report


def test_backbone_names_resolve_by_timm_module():
    from models.factory import backbone_arch

    assert backbone_arch("vit_base_patch16_224_in21k") == "vit"  # the original's name
    assert backbone_arch("test_vit") == "vit"  # any timm ViT, whatever its name
    assert backbone_arch("deit_small_patch16_224") == "vit"
    assert backbone_arch("vit_base_patch16_224.orig_in21k") == "vit"
    assert backbone_arch("swin_base_patch4_window7_224_in22k") == "swin"
    with pytest.raises(ValueError, match="unsupported backbone 'resnet50'"):
        backbone_arch("resnet50")
    m = create_dtl_model("test_vit", 3)
    assert isinstance(m, DTLVisionTransformer)


def test_rank_defaults_to_the_backbones():
    from timm.models import SwinTransformer

    from models.dtl_swin import DTLSwinTransformer

    vit = DTLVisionTransformer(tiny_vit(), 3, DTLConfig(fusion_size=3))
    swin = DTLSwinTransformer(SwinTransformer(img_size=32, patch_size=2, window_size=2, embed_dim=8, depths=(1, 1, 2, 1),
                                              num_heads=(1, 1, 2, 2), num_classes=0), 3, DTLConfig(fusion_size=5))
    assert vit.dtl_cfg.r == 2 and swin.dtl_cfg.r == 4  # the paper: ViT r = 2, Swin r = 4
    assert DTLVisionTransformer(tiny_vit(), 3, DTLConfig(r=5)).dtl_cfg.r == 5


def test_head_starts_as_the_original():
    """The original's ViT head (and Swin head): trunc-normal std .02 cut at +-2 (absolute), bias 0, as measured
    on the original (std 0.0200-0.0207); not zeros."""
    from models.dtl_swin import DTLSwinTransformer
    from tests.test_swin import tiny_swin

    torch.manual_seed(0)
    dtl = DTLConfig(r=2, fusion_size=0, csn_blocks="0-3", add_back_blocks="2-3")
    vit = DTLVisionTransformer(tiny_vit(), num_classes=300, dtl=dtl)
    swin = DTLSwinTransformer(tiny_swin(), num_classes=300, dtl=DTLConfig(r=2, csn_blocks="4-11", add_back_blocks="8-11"))
    for model in (vit, swin):
        for head in (model.head, (model.reset_classifier(200), model.head)[1]):
            w = head.weight.detach()
            assert w.numel() >= 200 * 16
            assert 0.0185 < float(w.std()) < 0.0215, float(w.std())
            assert abs(float(w.mean())) < 2e-3 and float(w.abs().max()) < 0.1
            assert torch.count_nonzero(head.bias) == 0 and head.weight.requires_grad
