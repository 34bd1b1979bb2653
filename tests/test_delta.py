"""models/delta.py: every form of delta read into one DeltaCheckpoint, written back, and rebuilt into the model by
one function with one backbone check; delta folders never read from outside themselves."""
import json
import logging
import os
import re

import pytest
import timm
import torch

import models
from models import DTLConfig, create_dtl_model, delta_state_dict
from models.delta import (
    build_from_delta, check_delta_folder_supported, delta_from_model, read_delta, spec_of_model, write_folder,
    write_pth,
)
from models.spec import WeightsSpec
from utils.checkpoint import RESUME_FORMAT, save_checkpoint
from utils.errors import BackboneMismatchError, CheckpointError, ModelSettingsError

VIT, VIT_KW = "vit_tiny_patch16_224", dict(patch_size=8, embed_dim=32, num_heads=2, depth=4)
SWIN, SWIN_KW = "swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                                                     window_size=2, patch_size=2)
CFG = {VIT: DTLConfig(r=2, fusion_size=3, csn_blocks="0-3", add_back_blocks="2-3"),
       SWIN: DTLConfig(r=2, fusion_size=3, csn_blocks="4-7", add_back_blocks="5,7")}
KW = {VIT: VIT_KW, SWIN: SWIN_KW}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _trained_like(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def _weights(tmp_path, name, seed, file="bb.pth"):
    torch.manual_seed(seed)
    torch.save(create_dtl_model(name, 2, img_size=32, **KW[name]).backbone.state_dict(), tmp_path / file)
    return str(tmp_path / file)


def _model(name, load_path, classes=4):
    return _trained_like(create_dtl_model(name, classes, CFG[name], load_path=load_path, img_size=32, **KW[name]))


@pytest.fixture(params=[VIT, SWIN])
def trained(request, tmp_path):
    name = request.param
    bb = _weights(tmp_path, name, 0)
    m = _model(name, bb)
    return name, bb, m, delta_from_model(m, spec_of_model(m, class_names=["a", "b", "c", "d"]), dataset="toy")


def test_every_form_reads_and_rebuilds_the_same_model(trained, tmp_path):
    name, bb, m, delta = trained
    pth = read_delta(write_pth(delta, tmp_path / "delta.pth"))
    folder = read_delta(write_folder(pth, tmp_path / "folder"))
    for d, kind in ((pth, "delta"), (folder, "folder")):
        assert d.kind == kind and d.spec == delta.spec and d.trained_on == delta.trained_on
        assert d.spec.weights.kind == "file" and d.spec.weights.source == "bb.pth"
        assert d.class_names == ("a", "b", "c", "d") and d.info["dataset"] == "toy"
        assert set(d.tensors) == set(delta_state_dict(m)) and d.checksums["file"].startswith("sha256:")
        rebuilt = build_from_delta(d, load_path=bb)
        assert type(rebuilt) is type(m) and torch.equal(rebuilt(X), m(X))
        assert torch.equal(models.load_delta(d.source, backbone_file=bb)(X), m(X))  # delta.pth and folder alike
    assert read_delta(tmp_path / "delta.pth").checksums["content"].startswith("sha256:")
    # a folder of a registered backbone loads through timm too (and is checked the same way)
    with_timm = timm.create_model("local-dir:" + str(tmp_path / "folder"), pretrained=True,
                                  pretrained_cfg_overlay=dict(file=bb)).eval()
    assert torch.equal(with_timm(X), m(X))


def test_last_pth_plain_and_original_state_dicts(tmp_path):
    bb = _weights(tmp_path, VIT, 0)
    m = _model(VIT, bb)
    tensors = delta_state_dict(m)
    save_checkpoint({"format": RESUME_FORMAT, "trainer": {"model_delta": tensors}, "epoch": 1, "seed_index": 0,
                     "model_spec": spec_of_model(m).to_dict()}, str(tmp_path / "last.pth"))
    last = read_delta(tmp_path / "last.pth")
    assert last.kind == "last" and last.info == {"epoch": 1, "seed_index": 0} and last.spec == spec_of_model(m)
    assert torch.equal(build_from_delta(last, load_path=bb)(X), m(X))
    torch.save(tensors, tmp_path / "plain.pth")
    plain = read_delta(tmp_path / "plain.pth")
    assert (plain.kind, plain.layout, plain.spec) == ("state_dict", "model", None)
    with pytest.raises(CheckpointError, match="without a model description"):
        build_from_delta(plain, load_path=bb)
    original = {re.sub(r"^side\.taps\.", "lora_dict.", k).replace("side.fusion.conv.weight", "lora_fusion.weight"): v
                for k, v in tensors.items()}
    torch.save({"state_dict": original}, tmp_path / "orig.pth")
    orig = read_delta(tmp_path / "orig.pth")
    assert (orig.kind, orig.layout) == ("original", "original")
    described = orig.__class__(spec_of_model(m), orig.tensors, orig.trained_on, source="orig", layout="original")
    assert torch.equal(build_from_delta(described, load_path=bb)(X), m(X))


def test_files_written_before_model_specs_still_load(tmp_path):
    """A delta.pth of the earlier layout (model_config / method / backbone / model_kwargs / backbone_weights)."""
    bb = _weights(tmp_path, VIT, 0)
    m = _model(VIT, bb)
    old = {"format": "dtl-delta/1", "delta": delta_state_dict(m), "model_config": m.model_config(), "method": "dtl+",
           "backbone": VIT, "model_kwargs": {"img_size": 32, "drop_path_rate": 0.1, **VIT_KW}, "dataset": "toy",
           "backbone_weights": models.pretrained.weights_record(m)}
    save_checkpoint(old, str(tmp_path / "old.pth"))
    d = read_delta(tmp_path / "old.pth")
    assert d.spec.backbone == VIT and d.spec.img_size == 32 and d.spec.drop_path_rate == 0.1
    assert d.trained_on.kind == "file" and d.trained_on.fingerprint == models.pretrained.weights_record(m)["fingerprint"]
    assert torch.equal(build_from_delta(d, load_path=bb)(X), m(X))


def test_backbone_mismatch_refused_or_allowed_with_a_log(trained, tmp_path, caplog):
    name, bb, m, delta = trained
    other = _weights(tmp_path, name, 1, "other.pth")
    for path in (write_pth(delta, tmp_path / "delta.pth"), write_folder(delta, tmp_path / "folder")):
        d = read_delta(path)
        with pytest.raises(BackboneMismatchError, match=r"trained on backbone weights bb.pth .*other.pth"):
            build_from_delta(d, load_path=other)
        with pytest.raises(BackboneMismatchError, match="randomly initialised"):
            build_from_delta(d, load_path="")
        with pytest.raises(BackboneMismatchError):
            models.load_delta(path, backbone_file=other)
        with pytest.raises(CheckpointError, match="trained on the backbone weights file bb.pth: give it"):
            models.load_delta(path)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            build_from_delta(d, load_path=other, allow_backbone_mismatch=True)
        assert "--allow_backbone_mismatch: " in caplog.text and "other.pth" in caplog.text
    with pytest.raises(BackboneMismatchError):  # the timm route refuses it too
        timm.create_model("local-dir:" + str(tmp_path / "folder"), pretrained=True,
                          pretrained_cfg_overlay=dict(file=other))


def test_a_random_backbone_is_recorded_as_random_and_rebuilt_from_its_seed(tmp_path, caplog):
    torch.manual_seed(7)
    m = _trained_like(create_dtl_model(VIT, 4, CFG[VIT], img_size=32, **VIT_KW))
    d = read_delta(write_pth(delta_from_model(m, init_seed=7), tmp_path / "delta.pth"))
    assert d.trained_on == WeightsSpec("random") and d.spec.weights.kind == "random"
    assert torch.load(tmp_path / "delta.pth", weights_only=True)["backbone_weights"] is None  # never a hub tag
    folder = write_folder(d, tmp_path / "folder")
    block = json.loads(open(os.path.join(folder, "config.json")).read())["dtl"]
    assert block["model_spec"]["weights"] == {"kind": "random", "source": None, "fingerprint": None}
    assert "backbone_weights" not in block
    with caplog.at_level(logging.WARNING):
        for rebuilt in (build_from_delta(d), build_from_delta(read_delta(folder), load_path="")):
            assert torch.equal(rebuilt(X), m(X))  # the same random backbone, from init_seed
    assert "randomly initialised backbone" in caplog.text and "older version" not in caplog.text
    bb = _weights(tmp_path, VIT, 0)
    with pytest.raises(BackboneMismatchError, match="randomly initialised backbone, but the backbone given is bb.pth") as e:
        build_from_delta(d, load_path=bb)
    assert "was trained on a randomly initialised backbone" in str(e.value)  # not "on backbone weights a random..."


def test_delta_file_must_stay_inside_the_folder(trained, tmp_path):
    name, bb, m, delta = trained
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = write_folder(delta, tmp_path / "f")
    os.replace(os.path.join(folder, "delta.safetensors"), outside / "secret.safetensors")
    cfg_path = os.path.join(folder, "config.json")
    cfg = json.loads(open(cfg_path).read())
    for bad in ("../outside/secret.safetensors", str(outside / "secret.safetensors"), "..\\outside\\x", ".."):
        block = {**cfg["dtl"], "delta_file": bad}
        block.pop("delta_sha256")
        open(cfg_path, "w").write(json.dumps({**cfg, "dtl": block}))
        for load in (read_delta, models.load_delta):
            with pytest.raises(CheckpointError, match=f"{re.escape(folder)}: config.json names delta_file .*plain file"):
                load(folder)
    os.symlink(outside / "secret.safetensors", os.path.join(folder, "link.safetensors"))
    open(cfg_path, "w").write(json.dumps({**cfg, "dtl": {**cfg["dtl"], "delta_file": "link.safetensors"}}))
    with pytest.raises(CheckpointError, match="is a link to .*outside the folder"):
        read_delta(folder)


def test_a_folder_without_its_checksum_is_unverifiable(trained, tmp_path):
    name, bb, m, delta = trained
    folder = write_folder(delta, tmp_path / "f")
    cfg_path = os.path.join(folder, "config.json")
    cfg = json.loads(open(cfg_path).read())
    cfg["dtl"].pop("delta_sha256")
    open(cfg_path, "w").write(json.dumps(cfg))
    for load in (read_delta, models.load_delta):
        with pytest.raises(CheckpointError, match="records no delta_sha256.*cannot be verified; write the folder again"):
            load(folder)


def test_damaged_files_are_refused(trained, tmp_path):
    name, bb, m, delta = trained
    path = write_pth(delta, tmp_path / "delta.pth")
    ck = torch.load(path, weights_only=True)
    ck["delta"] = {k: v + 1 for k, v in ck["delta"].items()}
    torch.save(ck, tmp_path / "changed.pth")
    with pytest.raises(CheckpointError, match="corrupt or truncated: .*changed.pth"):
        read_delta(tmp_path / "changed.pth")
    ck = torch.load(path, weights_only=True)
    ck["model_config"] = {**ck["model_config"], "num_classes": 7}  # a consistent file whose two descriptions disagree
    save_checkpoint(ck, str(tmp_path / "lies.pth"))
    with pytest.raises(CheckpointError, match="lies.pth: stored model configuration .* does not match the rebuilt"):
        build_from_delta(read_delta(tmp_path / "lies.pth"), load_path=bb)
    nan = {k: v.clone() for k, v in delta.tensors.items()}
    nan["head.bias"][0] = float("nan")
    torch.save(nan, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=r"nan.pth: non-finite values .*head.bias"):
        read_delta(tmp_path / "nan.pth")
    torch.save({"epoch": 3}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="junk.pth: not a delta, a last.pth or a state dict"):
        read_delta(tmp_path / "junk.pth")


def test_delta_folders_for_any_supported_backbone(tmp_path):
    """A backbone without a dtl_* entry point (deit3): the folder records its name and arguments and rebuilds."""
    kw = dict(patch_size=8, embed_dim=32, num_heads=2, depth=2)
    torch.manual_seed(0)
    torch.save(create_dtl_model("deit3_small_patch16_224", 2, img_size=32, **kw).backbone.state_dict(),
               tmp_path / "bb.pth")
    m = _trained_like(create_dtl_model("deit3_small_patch16_224", 3, DTLConfig(add_back_blocks="1"),
                                       load_path=str(tmp_path / "bb.pth"), img_size=32, **kw))
    check_delta_folder_supported(spec_of_model(m))
    folder = models.save_delta(m, tmp_path / "deit")
    block = json.loads(open(os.path.join(folder, "config.json")).read())["dtl"]
    assert block["model_spec"]["backbone"] == "deit3_small_patch16_224" and block["model_spec"]["backbone_kwargs"] == kw
    assert torch.equal(models.load_delta(folder, backbone_file=str(tmp_path / "bb.pth"))(X), m(X))
    with pytest.raises(ModelSettingsError, match="--method lora writes delta.pth only"):
        check_delta_folder_supported(spec_of_model(m).replace(method="lora", method_config={}))
    with pytest.raises(ModelSettingsError, match="resnet50"):
        check_delta_folder_supported(spec_of_model(m).replace(backbone="resnet50"))
