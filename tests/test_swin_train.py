"""Swin through train.py (issue 5): a tiny Swin trains end to end on a generated VTAB root through the Swin
DTL+ launcher (run by bash), its trainable counts match the side network's layout, ``--eval_only`` on the delta
reproduces the accuracy; without ``--r``/block flags a backbone gets its own defaults (Swin r=4 and the stage
rule of docs/method.md, section 1.2, ViT r=2, taps 0-11, add-back 6-11); lean mode and the prefix cache train Swin like the
default path."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import REPO, load_delta, read_results, read_summary, run_train

# Swin-T layout at toy size: 32 px, patch 2 -> a 16x16 grid, window 2, widths 16-32-64-128, 5 blocks.
DEPTHS = (1, 1, 2, 1)
DIMS = (16, 32, 64, 128)
SWIN_KWARGS = "embed_dim=16,depths=[1,1,2,1],num_heads=[1,1,2,2],patch_size=2,window_size=2"
SWIN = ["--model", "swin_tiny_patch4_window7_224", "--model_kwargs", SWIN_KWARGS, "--img_size", "32",
        "--num_workers", "0", "--batch_size_test", "16"]
TASK, N_CLASSES = "eurosat", 10


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from data.synthetic import make_vtab_root

    return make_vtab_root(str(tmp_path_factory.mktemp("swin_vtab")), tasks=(TASK,), n_train=32, n_val=8, n_test=24,
                          img_size=32, seed=0)


@pytest.fixture(scope="module")
def launcher_run(root, tmp_path_factory):
    """The Swin DTL+ launcher of the task with random init (LOAD_PATH=) and the tiny Swin; the launcher's
    blocks 4-23 / 14-23 (Swin-B) are replaced by ranges that span stages 0-3 of the 5-block model."""
    out = tmp_path_factory.mktemp("swin_launcher") / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "TORCHRUN_ARGS")}
    env.update(DATA_DIR=root, LOAD_PATH="", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    cmd = ["bash", str(REPO / "train_scripts" / "swin" / "vtab" / TASK / "train_dtl+.sh"), *SWIN,
           "--lora_before_blocks", "0-4", "--add_after_blocks", "1-4", "--epochs", "6", "--warmup_epochs", "1",
           "--lr", "1e-2", "--batch_size", "8", "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _expected_counts(r, fusion, csn, add):
    """Trainable tensors of DTL on the tiny Swin, written out: per stage (the side sum restarts there), the taps
    at or before the stage's last add-back block (A: r x d, B: d x r) and, for DTL+, one depthwise d x k x k
    convolution (no bias) per stage with add-back blocks; the head (last width -> classes, with bias)."""
    side, start = 0, 0
    for depth, dim in zip(DEPTHS, DIMS):
        blocks = range(start, start + depth)
        stage_add = [i for i in blocks if i in add]
        if stage_add:
            side += sum(2 * r * dim for i in blocks if i in csn and i <= max(stage_add))
            side += dim * fusion * fusion
        start += depth
    head = DIMS[-1] * N_CLASSES + N_CLASSES
    return side, head


def test_launcher_trains_a_tiny_swin(launcher_run):
    res = read_results(launcher_run)
    assert res["method"] == "dtl+" and res["benchmark"] == "vtab" and res["dataset"] == TASK
    assert res["backbone"].startswith("swin_tiny_patch4_window7_224[") and "depths=[1, 1, 2, 1]" in res["backbone"]
    assert res["epochs"] == 7 and res["n_test_images"] == {"test": 24}
    side, head = _expected_counts(r=4, fusion=5, csn=range(0, 5), add=range(1, 5))
    assert side == 7904  # stage 1: 256 + 800; stage 2: 1024 + 1600; stage 3: 1024 + 3200 (stage 0: no add-back)
    assert res["n_trainable_excl_head"] == side
    assert res["n_trainable"] == side + head
    losses = [float(row["train_loss"]) for row in read_summary(launcher_run)]
    assert len(losses) == 7 and losses[-1] < losses[0]

    ck = load_delta(launcher_run / "delta.pth")
    cfg = ck["model_config"]
    assert cfg["arch"] == "swin" and cfg["num_classes"] == N_CLASSES
    assert cfg["dtl"] == {"r": 4, "beta": 100.0, "fusion_size": 5, "csn_blocks": [0, 1, 2, 3, 4],
                          "add_back_blocks": [1, 2, 3, 4]}
    assert ck["model_kwargs"]["depths"] == list(DEPTHS) and ck["model_kwargs"]["img_size"] == 32
    # the delta holds exactly the trainable tensors: per-stage sides of stages 1-3 and the head
    assert sum(t.numel() for t in ck["delta"].values()) == side + head
    assert {k.split(".")[1] for k in ck["delta"] if k.startswith("side.")} == {"1", "2", "3"}
    assert ck["delta"]["side.3.fusion.conv.weight"].shape == (128, 1, 5, 5)


def test_eval_only_reproduces_the_accuracy(launcher_run, root, tmp_path):
    out = tmp_path / "eval"
    # the model, its sizes and img_size come from the checkpoint, not from these flags
    argv = ["--data_dir", root, "--dataset", TASK, "--num_workers", "0", "--eval_only", "--checkpoint",
            launcher_run / "delta.pth", "--output_dir", out]
    assert run_train(argv) == 0
    got, ref = read_results(out), read_results(launcher_run)
    assert ref["top1"] > 0.0
    assert got["top1"] == ref["top1"] and got["method"] == "dtl+"
    assert got["backbone"] == ref["backbone"]
    assert got["n_trainable"] == ref["n_trainable"]


def _build(argv):
    import train
    from cli.specs import build_experiment, parse_args

    spec = build_experiment(parse_args(["--dataset", TASK, *argv])).model.replace(num_classes=N_CLASSES)
    with torch.device("meta"):
        return train.build_model(spec, weights=False)


def test_defaults_are_the_backbones():
    """No --r / --lora_before_blocks / --add_after_blocks: Swin r=4 with its stage rule, ViT r=2, 0-11 / 6-11."""
    from models.dtl_swin import swin_default_blocks

    swin = _build(["--model", "swin_base_patch4_window7_224_in22k"]).dtl_cfg
    assert (swin.r, swin.csn_blocks, swin.add_back_blocks) == (4, list(range(4, 24)), list(range(14, 24)))
    tiny = _build(SWIN).dtl_cfg
    assert (tiny.r, (tiny.csn_blocks, tiny.add_back_blocks)) == (4, swin_default_blocks(DEPTHS))
    assert swin_default_blocks(DEPTHS) == ([2, 3, 4], [3, 4])
    vit = _build(["--model", "vit_base_patch16_224_in21k"]).dtl_cfg
    assert (vit.r, vit.csn_blocks, vit.add_back_blocks) == (2, list(range(12)), list(range(6, 12)))
    # explicit flags win, on either backbone
    cfg = _build([*SWIN, "--r", "2", "--lora_before_blocks", "1-4", "--add_after_blocks", "4"]).dtl_cfg
    assert (cfg.r, cfg.csn_blocks, cfg.add_back_blocks) == (2, [1, 2, 3, 4], [4])
    cfg = _build(["--model", "vit_base_patch16_224_in21k", "--r", "8", "--add_after_blocks", "9-11"]).dtl_cfg
    assert (cfg.r, cfg.csn_blocks, cfg.add_back_blocks) == (8, list(range(12)), [9, 10, 11])


@pytest.fixture(scope="module")
def default_runs(root, tmp_path_factory):
    """A tiny Swin DTL+ run without DTL flags, and the same with --lean --cache_prefix (float32 cache)."""
    base = tmp_path_factory.mktemp("swin_defaults")
    common = ["--data_dir", root, "--dataset", TASK, *SWIN, "--epochs", "2", "--warmup_epochs", "1", "--lr", "1e-2",
              "--batch_size", "8", "--fusion_size", "3"]
    out = {}
    for name, extra in (("default", []), ("lean_cache", ["--lean", "--cache_prefix", "--cache_dtype", "float32"])):
        out[name] = base / name
        assert run_train([*common, *extra, "--output_dir", out[name]]) == 0, name
    return out


def test_run_without_dtl_flags_uses_swin_defaults(default_runs):
    cfg = load_delta(default_runs["default"] / "delta.pth")["model_config"]["dtl"]
    assert cfg["r"] == 4 and cfg["csn_blocks"] == [2, 3, 4] and cfg["add_back_blocks"] == [3, 4]
    side, head = _expected_counts(r=4, fusion=3, csn=[2, 3, 4], add=[3, 4])
    res = read_results(default_runs["default"])
    assert (res["n_trainable_excl_head"], res["n_trainable"]) == (side, side + head)


def test_lean_and_prefix_cache_train_swin_like_the_default(default_runs):
    ref, got = default_runs["default"], default_runs["lean_cache"]
    ref_losses = [float(r["train_loss"]) for r in read_summary(ref)]
    losses = [float(r["train_loss"]) for r in read_summary(got)]
    assert losses[-1] != losses[0]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    res = read_results(got)
    assert res["top1"] == read_results(ref)["top1"]
    assert res["lean"] is True and res["cache_prefix"] is True and res["cache_approximate"] is False
    # cached for 40 images: the inputs of tap 2 and of block 3 (the first add-back block), both in stage 2:
    # a 4 x 4 token grid (16 / 2 / 2) of width 64, float32
    assert res["cache_mib"] == pytest.approx(40 * 2 * 4 * 4 * 64 * 4 / 2 ** 20, abs=1e-3)


def test_model_kwargs_take_lists():
    import argparse

    from cli.flags import model_kwargs_type

    assert model_kwargs_type(SWIN_KWARGS) == {"embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 1, 2, 2],
                                              "patch_size": 2, "window_size": 2}
    assert model_kwargs_type("depths=(2,2,6,2),mlp_ratio=2.5") == {"depths": [2, 2, 6, 2], "mlp_ratio": 2.5}
    for bad in ("depths=[1,2", "depths=1,2]", "[1]=2", "embed_dim"):
        with pytest.raises(argparse.ArgumentTypeError):
            model_kwargs_type(bad)
