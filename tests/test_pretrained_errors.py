"""Backbone weights that cannot be used are refused with one line naming the file and the reason
(models/pretrained.py): NaN / inf tensors (naming the first bad tensor), and the weights of another architecture
(saying what the file looks like and what the run expects). Synthetic files in the real formats."""
from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import TINY, run_train, vtab_root
from models import CheckpointError, create_dtl_model
from models.npz import save_vit_npz, vit_to_npz_dict
from models.pretrained import describe_state_dict

VIT = "vit_tiny_patch16_224"
VIT_KW = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
SWIN = "swin_tiny_patch4_window7_224"
SWIN_KW = dict(img_size=32, patch_size=2, window_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 2))


def _sd(name, **kw):
    return {k: v.contiguous() for k, v in timm.create_model(name, **kw).state_dict().items()}


def _save(sd, path):
    save_file(sd, str(path)) if str(path).endswith(".safetensors") else torch.save(sd, path)
    return str(path)


@pytest.mark.parametrize("fmt,value,kind", [("pth", float("nan"), "NaN"), ("safetensors", float("inf"), "inf"),
                                            ("pth", float("-inf"), "inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, fmt, value, kind):
    sd = _sd(VIT, **VIT_KW)
    sd["blocks.1.mlp.fc1.weight"][3, 2] = value
    sd["blocks.1.mlp.fc2.weight"][0, 0] = value  # a later bad tensor: the first one is named
    path = _save(sd, tmp_path / f"bad.{fmt}")
    with pytest.raises(CheckpointError, match=rf"bad\.{fmt}: tensor 'blocks\.1\.mlp\.fc1\.weight' holds {kind} "
                                              r"\(1 of 4096 values not finite\)"):
        create_dtl_model(VIT, 3, load_path=path, **VIT_KW)


def test_non_finite_npz_is_refused_naming_the_array(tmp_path):
    bb = timm.create_model(VIT, num_classes=0, **VIT_KW)
    with torch.no_grad():
        bb.blocks[0].attn.proj.weight[1, 1] = float("nan")
    path = str(tmp_path / "ViT.npz")
    save_vit_npz(bb, path)
    key = next(k for k, v in vit_to_npz_dict(bb).items() if np.isnan(v).any())
    with pytest.raises(CheckpointError, match=rf"ViT\.npz: tensor '{key}' holds NaN"):
        create_dtl_model(VIT, 3, load_path=path, **VIT_KW)


def test_non_finite_weights_are_refused_through_timm(tmp_path):
    sd = _sd(VIT, **VIT_KW)
    sd["pos_embed"][0, 0, 0] = float("nan")
    path = _save(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: tensor 'pos_embed' holds NaN"):
        timm.create_model("dtl_vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=path),
                          **VIT_KW)


@pytest.mark.parametrize("src,src_kw,dst,dst_kw,looks,expects", [
    (SWIN, SWIN_KW, VIT, VIT_KW, r"a Swin \(embed dim 16, patch 2, depths \(1, 1\)\)",
     r"a timm VisionTransformer \(embed dim 32, patch 8, depth 2, class token\)"),
    (VIT, VIT_KW, SWIN, SWIN_KW, r"a ViT \(embed dim 32, patch 8, depth 2, class token\)",
     r"a timm SwinTransformer \(embed dim 16, patch 2, depths \(1, 1\)\)"),
    (VIT, dict(VIT_KW, embed_dim=64, depth=3), VIT, VIT_KW, r"a ViT \(embed dim 64, patch 8, depth 3, class token\)",
     r"a timm VisionTransformer \(embed dim 32"),
    ("swinv2_tiny_window8_256", SWIN_KW, SWIN, SWIN_KW, r"a Swin V2 \(embed dim 16", r"a timm SwinTransformer"),
    ("vit_medium_patch16_gap_256", VIT_KW, VIT, dict(VIT_KW, reg_tokens=2), r"a ViT \(.*no class token\)",
     r"a timm VisionTransformer \(.*, class token, 2 register tokens\)"),
    ("resnet18", {}, VIT, VIT_KW, r"a ResNet-style CNN", r"a timm VisionTransformer"),
])
def test_weights_of_another_architecture_say_what_they_look_like(tmp_path, src, src_kw, dst, dst_kw, looks, expects):
    path = _save(_sd(src, **src_kw), tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as e:
        create_dtl_model(dst, 3, load_path=path, **dst_kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(path), msg
    assert re.search(rf"the file looks like {looks}.*this run expects {expects}", msg), msg


def test_describe_state_dict_knows_the_layouts():
    bb = timm.create_model(VIT, num_classes=0, **VIT_KW)
    assert describe_state_dict({k: torch.from_numpy(v) for k, v in vit_to_npz_dict(bb).items()}) == \
        "a Google ViT .npz (depth 2, patch 8, embed dim 32)"
    assert describe_state_dict(_sd("eva02_tiny_patch14_224", img_size=28, depth=2, embed_dim=32, num_heads=2)) \
        .startswith("a EVA-style ViT (embed dim 32, patch 14, depth 2")
    assert describe_state_dict({"lora_dict.0.lora_A": torch.zeros(2, 4), **_sd(VIT, **VIT_KW)}).endswith(
        "with the original DTL side network (lora_dict.*)")
    assert describe_state_dict({"a.b": torch.zeros(1)}) == "no known backbone layout (first keys: a.b)"


def test_train_refuses_nan_weights_with_exit_2(tmp_path_factory, tmp_path, caplog):
    root = vtab_root(tmp_path_factory)
    sd = _sd(VIT, img_size=32)
    sd["cls_token"][0, 0, 5] = float("nan")
    path = _save(sd, tmp_path / "nan.pth")
    argv = ["--data_dir", root, "--dataset", "cifar_100", *TINY, "--epochs", "1", "--warmup_epochs", "0",
            "--batch_size", "8", "--output_dir", str(tmp_path / "out"), "--load_path", path]
    assert run_train(argv) == 2
    assert "tensor 'cls_token' holds NaN" in caplog.text


# ------------------------------------------------------------------------- timm's weights without a network
@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """No network and an empty Hugging Face cache: huggingface_hub reads HF_HUB_OFFLINE / HF_HOME /
    HUGGINGFACE_HUB_CACHE / HF_HUB_CACHE once, at import, into huggingface_hub.constants (what hf_hub_download
    consults on each call), so both the environment (subprocesses) and the constants (this process) are set."""
    import huggingface_hub.constants as c

    home = tmp_path / "hf_home"
    for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(home)), ("HUGGINGFACE_HUB_CACHE", str(home / "hub")),
                       ("HF_HUB_CACHE", str(home / "hub"))):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HOME", str(home))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(c, "HUGGINGFACE_HUB_CACHE", str(home / "hub"))
    return home


TIMM_TAG = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # timm's default weights of vit_tiny_patch16_224


def _tiny_delta(tmp_path, num_classes=4):
    from models.delta import delta_from_model, spec_of_model, write_pth

    torch.manual_seed(0)
    m = create_dtl_model(VIT, num_classes, **VIT_KW)
    return write_pth(delta_from_model(m, spec_of_model(m, backbone=VIT)), tmp_path / "delta.pth")


def _one_error_line(text):
    lines = [ln for ln in text.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_timm_weights_that_cannot_be_downloaded_are_one_error_line(no_hub, tmp_path, caplog, capsys):
    """--load_path timm offline with nothing cached: every entry point names the weights it wanted (tag, hub
    repository) and what to do (network, or a local file with --load_path); train.py exits 2 before any run
    folder exists, --eval_only too; tools/predict.py and models.load_delta say the same."""
    import models
    from data.synthetic import make_folder_root
    from tools import predict

    root = make_folder_root(str(tmp_path / "data"), n_train=2, n_test=1)
    tiny = ["--model", VIT, "--img_size", "32", "--model_kwargs", "embed_dim=32,num_heads=2,depth=2,patch_size=8",
            "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--batch_size", "4",
            "--benchmark", "folder", "--data_dir", root, "--dataset", "mine"]
    delta = _tiny_delta(tmp_path)
    for extra in ([], ["--eval_only", "--checkpoint", delta, "--allow_backbone_mismatch"]):
        caplog.clear()
        out = tmp_path / ("out_eval" if extra else "out")
        assert run_train([*tiny, "--load_path", "timm", "--output_dir", str(out), *extra]) == 2
        line = _one_error_line(caplog.text)
        assert TIMM_TAG in line and "timm/" + TIMM_TAG in line and "--load_path" in line and "network" in line
        assert not out.exists()
    capsys.readouterr()
    assert predict.main(["--load_path", "timm", "--deltas", delta, "--images", root + "/test",
                         "--allow_backbone_mismatch"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert TIMM_TAG in line and "--load_path" in line
    with pytest.raises(CheckpointError, match=re.escape(TIMM_TAG) + ".*backbone_file"):
        models.load_delta(delta, backbone_file="timm", allow_backbone_mismatch=True)
    with pytest.raises(CheckpointError, match=re.escape(TIMM_TAG)):  # a dtl_* entry point the timm way
        timm.create_model("dtl_vit_tiny_patch16_224", pretrained=True, num_classes=3, img_size=32, depth=2)
