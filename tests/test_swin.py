"""DTL / DTL+ on Swin: faithfulness to the original, per-stage side networks, weight loading."""
import re
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import SwinTransformer

import models
from models import CheckpointError, DTLConfig, create_dtl_model
from models.convert import convert_original_swin
from models.dtl_swin import DTLSwinTransformer, create_swin_backbone, swin_default_blocks
from models.pretrained import load_backbone_weights
from models.reference import check_fixture, swin_from_fixture_config
from models.side_network import DepthwiseFusion
from tests.conftest import FIXTURES, REPO

SWIN_FIXTURES = sorted(p.name for p in FIXTURES.glob("swin_*")) if FIXTURES.is_dir() else []

# A tiny Swin: 32 px, patch 2, window 2 -> token grids 16, 8, 4, 2; widths 16, 32, 64, 128; blocks 0-1 | 2-3 | 4-9 | 10-11.
TINY = dict(img_size=32, patch_size=2, window_size=2, embed_dim=16, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8))


def tiny_swin(**kw) -> SwinTransformer:
    return SwinTransformer(**{**TINY, **kw, "num_classes": 0, "drop_path_rate": 0.0})


def tiny_dtl(csn="4-11", add="8-11", fusion_size=0, r=2, **kw) -> DTLSwinTransformer:
    torch.manual_seed(0)
    dtl = DTLConfig(r=r, fusion_size=fusion_size, csn_blocks=csn, add_back_blocks=add)
    return DTLSwinTransformer(tiny_swin(**kw), num_classes=5, dtl=dtl)


def randomize_side_and_head(model, std=0.1):
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(("side.", "head.")):
                p.normal_(0, std)


def same_pad_dwconv(x_nhwc, weight):
    """Depthwise conv with PyTorch's padding='same' written out (extra pad right/bottom for even k)."""
    k = weight.shape[-1]
    lo, hi = (k - 1) // 2, (k - 1) - (k - 1) // 2
    x = F.pad(x_nhwc.permute(0, 3, 1, 2), (lo, hi, lo, hi))
    return F.conv2d(x, weight, groups=weight.shape[0]).permute(0, 2, 3, 1)


def manual_forward(model, x, csn, add, beta=100.0):
    """The Swin rule (docs/method.md, section 1.2) written out in the original's order: patch merging at the *end* of a stage, global block
    numbers, the side sum restarting at every stage. Taps the model did not create get random tensors here:
    if one of them mattered, the outputs would differ."""
    bb = model.backbone
    gen = torch.Generator().manual_seed(7)
    x = bb.patch_embed(x)
    stages = list(bb.layers)
    i = 0
    for j, stage in enumerate(stages):
        s = torch.zeros(())
        side = model.side[str(j)] if str(j) in model.side else None
        for blk in stage.blocks:
            if i in csn:
                if side is not None and side.has_tap(i):
                    a, b = side.taps[str(i)].lora_A, side.taps[str(i)].lora_B
                else:
                    a = torch.randn(model.dtl_cfg.r, x.shape[-1], generator=gen)
                    b = torch.randn(x.shape[-1], model.dtl_cfg.r, generator=gen)
                s = s + x @ a.t() @ b.t()
            x = blk(x)
            if i in add:
                g = s * torch.sigmoid(beta * s)
                if model.dtl_cfg.fusion_size:
                    g = same_pad_dwconv(g, side.fusion.conv.weight)
                x = x + g
            i += 1
        if j + 1 < len(stages):
            x = stages[j + 1].downsample(x)
    return model.head(bb.norm(x).mean(dim=(1, 2)))


# --------------------------------------------------------------------------------------------- the original


@pytest.mark.parametrize("name", SWIN_FIXTURES)
def test_reference_fixture_matches_original(fixtures_dir, name):
    res = check_fixture(str(fixtures_dir / name))
    assert res.ok, res.line()
    assert res.logits_diff <= 1e-5 and res.side_off_diff <= 1e-5 and res.loss_diff <= 1e-5
    assert res.grad_rel_diff <= 1e-4 and res.n_trainable == res.n_expected


def test_swin_fixtures_present(fixtures_dir):
    assert {"swin_tiny_dtl", "swin_tiny_dtlplus"} <= set(SWIN_FIXTURES)


@pytest.mark.parametrize("name", ["swin_tiny_dtlplus"])
def test_converter_is_strict_and_drops_only_unused(fixtures_dir, name):
    import json

    folder = fixtures_dir / name
    meta = json.loads((folder / "meta.json").read_text())
    model = swin_from_fixture_config(meta["config"])
    ref = torch.load(folder / "reference_state_dict.pt", weights_only=True)
    out = convert_original_swin(ref, model)
    missing, unexpected = model.load_state_dict(out, strict=False)
    assert not missing and not unexpected
    # patch merging moved from the end of stage i to the start of stage i+1
    assert torch.equal(model.backbone.layers[1].downsample.reduction.weight, ref["layers.0.downsample.reduction.weight"])
    assert isinstance(model.backbone.layers[0].downsample, torch.nn.Identity)
    # what was left out: buffers, the layers.<i>.lora_* aliases and the fusions that never get a gradient
    kept_ids = {id(v) for v in out.values()}
    dropped = {k for k, v in ref.items() if id(v) not in kept_ids}
    expected = {k for k in ref if k.endswith(("relative_position_index", "attn_mask")) or re.match(r"layers\.\d+\.lora_", k)}
    assert dropped == expected | set(meta["trainable_unused_in_reference"])
    assert {"lora_fusions.0.weight", "lora_fusions.1.weight"} <= dropped
    assert len(out) == len(ref) - len(dropped)
    # the gradients of the fixture map onto exactly the trainable tensors
    grads = convert_original_swin(torch.load(folder / "io.pt", weights_only=True)["grads"], model)
    assert set(grads) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_check_reference_cli_passes_on_swin(fixtures_dir):
    folders = [str(fixtures_dir / n) for n in SWIN_FIXTURES]
    res = subprocess.run([sys.executable, "tools/check_reference.py", *folders], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("PASS swin_") == len(folders)


# ------------------------------------------------------------------------------------------ the model itself


@pytest.mark.parametrize("fusion_size", [0, 4, 5])
def test_side_path_is_zero_at_init(fusion_size):
    model = tiny_dtl(fusion_size=fusion_size).eval()
    with torch.no_grad():
        model.head.weight.normal_()
        x = torch.randn(2, 3, 32, 32)
        bb = model.backbone
        frozen = model.head(bb.norm(bb.layers(bb.patch_embed(x))).mean(dim=(1, 2)))
        assert torch.equal(model(x), frozen)


@pytest.mark.parametrize("csn,add,fusion_size", [
    ("4-11", "8-11", 0), ("4-11", "8-11", 5),  # the paper's rule on Swin-T depths
    ("2-11", "3-11", 4),                       # spans stages 1-3, even kernel
    ("0-11", "1,5,10", 3),                     # one add-back block in stages 0, 2 and 3
])
def test_matches_spec_written_out(csn, add, fusion_size):
    model = tiny_dtl(csn=csn, add=add, fusion_size=fusion_size).eval()
    randomize_side_and_head(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = manual_forward(model, x, set(model.dtl_cfg.csn_blocks), set(model.dtl_cfg.add_back_blocks))
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    side_off = model(x) - ref  # sanity: the side path really changes the output
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.zero_()
        assert (model(x) - ref).abs().max() > 1e-3 > side_off.abs().max()


def test_only_side_and_head_receive_gradients():
    model = tiny_dtl(csn="2-11", add="3-11", fusion_size=3).train()
    randomize_side_and_head(model)
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 3])).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == trainable
    assert all(n.startswith(("side.", "head.")) for n in trainable)
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable)
    # a range spanning stages 1-3: taps 2-11, one fusion per stage with add-back blocks
    assert sorted(model.side) == ["1", "2", "3"]
    assert {f"side.{j}.fusion.conv.weight" for j in (1, 2, 3)} <= trainable
    assert {f"side.{model.stage_of(i)}.taps.{i}.lora_A" for i in range(2, 12)} <= trainable
    assert model.side["1"].fusion.conv.weight.shape == (32, 1, 3, 3)
    assert model.side["3"].taps["11"].lora_B.shape == (128, 2)


def test_no_tensors_for_stages_without_add_back():
    # taps in stages 1, 2 and 3, add-back only in stage 2: stage 1's sum restarts before it could be added
    # back, stage 3's taps come after the last add-back block -> only stage 2 gets a side network.
    model = tiny_dtl(csn="2-11", add="6-8", fusion_size=5)
    assert list(model.side) == ["2"]
    assert sorted(model.side["2"].taps, key=int) == ["4", "5", "6", "7", "8"]
    counts = models.count_parameters(model)
    assert counts.trainable_excl_head == 5 * 2 * 2 * 64 + 64 * 25
    # the side sum does not carry over from stage 2 into stage 3: taps in stage 2 with add-back only in stage 3
    # create nothing at all
    model = tiny_dtl(csn="4-9", add="10-11", fusion_size=5)
    assert len(model.side) == 0
    assert models.count_parameters(model).trainable_excl_head == 0
    assert set(models.delta_state_dict(model)) == {"head.weight", "head.bias"}


def test_blocks_before_first_add_back_keep_no_activations():
    model = tiny_dtl(csn="4-11", add="8-11").train()
    randomize_side_and_head(model)
    current = {"block": None}
    saved_in = []
    blocks = [blk for stage in model.backbone.layers for blk in stage.blocks]
    for i, blk in enumerate(blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: current.update(block=i))
        blk.register_forward_hook(lambda m, a, o: current.update(block=None))

    def pack(t):
        saved_in.append(current["block"])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    inside = [b for b in saved_in if b is not None]
    assert inside, "tail blocks should save activations"
    # blocks 0-8 (up to the first add-back block, whose input depends on no trainable tensor) save nothing
    assert min(inside) == 9, f"blocks {sorted(set(b for b in inside if b < 9))} kept activations"


@pytest.mark.parametrize("k", [4, 5])
def test_fusion_on_nhwc_grid_matches_same_padding(k):
    torch.manual_seed(k)
    fusion = DepthwiseFusion(8, k)
    x = torch.randn(2, 6, 5, 8)  # B x H x W x C, non-square
    torch.testing.assert_close(fusion(x), same_pad_dwconv(x, fusion.weight), rtol=0, atol=1e-6)
    if k == 4:  # the extra row/column of padding really is at the right/bottom
        left_heavy = F.conv2d(F.pad(x.permute(0, 3, 1, 2), (2, 1, 2, 1)), fusion.weight, groups=8).permute(0, 2, 3, 1)
        assert (fusion(x) - left_heavy).abs().max() > 1e-3


def test_non_square_image_and_odd_grids():
    # 40 x 24 px, patch 4 -> grids 10x6, 5x3, 3x2 (merging pads odd sizes), 2x1; window 2 (clamped to the grid)
    model = tiny_dtl(csn="2-11", add="3-11", fusion_size=4, img_size=(40, 24), patch_size=4).train()
    randomize_side_and_head(model)
    x = torch.randn(2, 3, 40, 24)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.side.parameters())
    with torch.no_grad():
        ref = manual_forward(model.eval(), x, set(range(2, 12)), set(range(3, 12)))
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_split_forward_matches_forward():
    model = tiny_dtl(csn="2-11", add="3-11", fusion_size=3).eval()
    randomize_side_and_head(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        t = model.forward_stage(model.forward_stage(model.embed(x), 0), 1)
        stage, side, s = model.backbone.layers[2], model.side["2"], None
        t = stage.downsample(t)
        for i in (4, 5):
            s = side.tap(s, i, t)
            t = side.inject(stage.blocks[i - 4](t), s, i)
        t = model.forward_blocks(t, start=6, s=s)
        torch.testing.assert_close(model.forward_head(t), full, rtol=0, atol=0)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 128)
    assert [model.stage_of(i) for i in (0, 1, 2, 3, 4, 9, 10, 11)] == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(IndexError):
        model.stage_of(12)


def test_default_blocks_and_swin_b_counts():
    assert swin_default_blocks((2, 2, 18, 2)) == (list(range(4, 24)), list(range(14, 24)))
    assert swin_default_blocks((2, 2, 6, 2)) == (list(range(4, 12)), list(range(8, 12)))
    # Swin-B, r = 4: taps 4-21 (width 512) and 22-23 (width 1024); DTL+ k = 5: one conv in stages 2 and 3
    for k, extra in [(0, 0), (5, (512 + 1024) * 25)]:
        dtl = None if k == 0 else DTLConfig(r=4, fusion_size=5)
        m = create_dtl_model("swin_base_patch4_window7_224_in22k", 100, dtl, device="meta")
        c = models.count_parameters(m)
        assert c.trainable_excl_head == 18 * 2 * 4 * 512 + 2 * 2 * 4 * 1024 + extra  # 90,112 (+38,400)
        assert c.head == 1024 * 100 + 100
        assert m.dtl_cfg.r == 4 and m.dtl_cfg.beta == 100.0
        assert m.dtl_cfg.csn_blocks == list(range(4, 24)) and m.dtl_cfg.add_back_blocks == list(range(14, 24))


def test_registered_in_timm_and_config_round_trip():
    assert {f"dtl_swin_{s}_patch4_window7_224" for s in ("tiny", "small", "base")} <= set(timm.list_models("dtl_swin_*"))
    m = timm.create_model("dtl_swin_tiny_patch4_window7_224", num_classes=3, fusion_size=5, **TINY)
    assert isinstance(m, DTLSwinTransformer) and m.num_classes == 3 and m.num_features == 128
    assert m.side["2"].taps["4"].lora_A.shape == (4, 64)  # Swin's default rank
    assert m.dtl_cfg.csn_blocks == list(range(4, 12)) and m.dtl_cfg.add_back_blocks == list(range(8, 12))
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    cfg = m.model_config()
    assert cfg["arch"] == "swin" and cfg["num_classes"] == 3 and cfg["dtl"]["fusion_size"] == 5
    rebuilt = DTLSwinTransformer(tiny_swin(), cfg["num_classes"], DTLConfig.from_dict(cfg["dtl"]))
    models.load_delta_state_dict(rebuilt, models.delta_state_dict(m))
    m.reset_classifier(7)
    assert m.get_classifier().out_features == 7 and m.head.weight.requires_grad
    assert not any(p.requires_grad for p in m.backbone.parameters())


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="add_back_blocks contains \\[12\\]"):
        DTLSwinTransformer(tiny_swin(), 5, DTLConfig(add_back_blocks="8-12"))
    with pytest.raises(ValueError, match="not a timm Swin"):
        create_swin_backbone("vit_base_patch16_224")
    with pytest.raises(TypeError, match="wraps a timm SwinTransformer"):
        DTLSwinTransformer(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0), 5)
    with pytest.raises(KeyError, match="lacks \\['window_size'\\]"):
        swin_from_fixture_config({"arch": "swin", **{k: 1 for k in ("img_size", "patch_size", "embed_dim", "depths",
                                  "num_heads", "mlp_ratio", "qkv_bias", "layer_norm_eps", "num_classes", "r", "beta",
                                  "fusion_size", "csn_blocks", "add_back_blocks")}})


# ------------------------------------------------------------------------------------------ pre-trained weights


def _source_swin(num_classes=7) -> SwinTransformer:
    torch.manual_seed(3)
    src = SwinTransformer(**TINY, num_classes=num_classes)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.05)
    return src


def _microsoft_layout(src: SwinTransformer) -> dict:
    """The original Microsoft release layout: patch merging at the end of stage i, head.*, buffers included."""
    sd = {}
    for k, v in src.state_dict().items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        sd[k.replace("head.fc.", "head.")] = v
    for name, buf in src.named_buffers():
        if buf is not None and name.endswith(("relative_position_index", "attn_mask")):
            sd[name] = buf
    return sd


def _assert_backbone_equal(model, src):
    own = model.backbone.state_dict()
    ref = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    assert set(own) == set(ref)
    for k, v in ref.items():
        assert torch.equal(own[k], v), k


def test_timm_swin_pth_loads(tmp_path):
    src = _source_swin()
    path = tmp_path / "swin_timm.pth"
    torch.save(src.state_dict(), path)
    model = create_dtl_model("swin_tiny_patch4_window7_224", 5, DTLConfig(r=2, fusion_size=5), load_path=str(path), **TINY)
    _assert_backbone_equal(model, src)
    assert not torch.equal(model.head.weight[:5], src.head.fc.weight[:5])  # the head is fresh
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # side path zero at init: same features as the source backbone (timm's include the norm)
        model.eval()
        torch.testing.assert_close(model.backbone.norm(model.forward_features(x)), src.eval().forward_features(x),
                                   rtol=0, atol=0)


def test_microsoft_swin_release_layout_loads(tmp_path):
    src = _source_swin()
    sd = _microsoft_layout(src)
    assert "layers.0.downsample.reduction.weight" in sd and "layers.3.downsample.reduction.weight" not in sd
    assert "head.weight" in sd and any(k.endswith("relative_position_index") for k in sd)
    path = tmp_path / "swin_base_patch4_window7_224_22k.pth"
    torch.save({"model": sd}, path)
    model = create_dtl_model("swin_base_patch4_window7_224_in22k", 5, load_path=str(path), **TINY)
    _assert_backbone_equal(model, src)
    assert load_backbone_weights(model, str(path)) == len(list(model.backbone.parameters()))


def test_swin_checkpoint_missing_tensor_is_named(tmp_path):
    src = _source_swin()
    sd = src.state_dict()
    del sd["layers.2.blocks.3.mlp.fc1.weight"]
    path = tmp_path / "short_timm.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="short_timm.pth leaves backbone tensors uninitialised: "
                                              "layers.2.blocks.3.mlp.fc1.weight"):
        create_dtl_model("swin_tiny_patch4_window7_224", 5, load_path=str(path), **TINY)
    ms = _microsoft_layout(src)
    del ms["layers.0.downsample.norm.weight"]  # = timm's layers.1.downsample.norm.weight
    path = tmp_path / "short_ms.pth"
    torch.save({"model": ms}, path)
    with pytest.raises(CheckpointError, match="short_ms.pth leaves backbone tensors uninitialised: "
                                              "layers.1.downsample.norm.weight"):
        create_dtl_model("swin_base_patch4_window7_224_in22k", 5, load_path=str(path), **TINY)


def test_original_name_selects_imagenet22k_weights(monkeypatch):
    import models.backbones as backbones

    asked = []

    def fake_create_model(name, pretrained=False, **kw):
        asked.append((name, pretrained, kw["num_classes"]))
        return tiny_swin()

    monkeypatch.setattr(backbones.timm, "create_model", fake_create_model)
    create_swin_backbone("swin_base_patch4_window7_224_in22k", pretrained=True)
    create_swin_backbone("swin_base_patch4_window7_224_in22k")
    create_swin_backbone("dtl_swin_tiny_patch4_window7_224")
    assert asked == [("swin_base_patch4_window7_224.ms_in22k", True, 0), ("swin_base_patch4_window7_224", False, 0),
                     ("swin_tiny_patch4_window7_224", False, 0)]
    assert timm.models.get_pretrained_cfg("swin_base_patch4_window7_224.ms_in22k").num_classes == 21841
