"""Every baseline method trains end to end through train.py (a launcher-style command) on a generated VTAB root,
writes a delta holding only its trainable tensors, and its delta evaluates back to the same accuracy."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO
from helpers_train import TINY, load_delta, read_results, run_train, vtab_root
from models import count_parameters
from models.baselines import BASELINE_METHODS, create_baseline_model
from models.trainable import is_trainable

NCLS = 16  # dsprites_loc


@pytest.fixture(scope="module")
def vtab(tmp_path_factory):
    return vtab_root(tmp_path_factory)


def argv(vtab, method, out):
    return ["--data_dir", vtab, "--dataset", "dsprites_loc", *TINY, "--method", method, "--epochs", "1",
            "--warmup_epochs", "0", "--batch_size", "8", "--lr", "1e-3", "--output_dir", str(out)]


def expected_model(method):
    return create_baseline_model(method, "vit_tiny_patch16_224", NCLS, img_size=32, device="meta")


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_baseline_trains_end_to_end(vtab, tmp_path, method):
    out = tmp_path / "run"
    assert run_train(argv(vtab, method, out)) == 0
    res = read_results(out)
    assert res["method"] == method and res["dataset"] == "dsprites_loc" and 0.0 <= res["top1"] <= 100.0
    ref = expected_model(method)
    counts = count_parameters(ref)
    assert res["n_trainable"] == counts.trainable and res["n_trainable_excl_head"] == counts.trainable_excl_head
    ck = load_delta(out / "delta.pth")
    names = {n for n, _ in ref.named_parameters() if is_trainable(ref, n)}
    assert set(ck["delta"]) == names
    assert ck["model_config"] == ref.model_config()
    if method != "full":  # the delta is small: no frozen backbone tensor in it
        assert not any(n.startswith("backbone.") and not n.endswith(".bias") for n in ck["delta"])


def test_launcher_command_and_eval_only_round_trip(vtab, tmp_path):
    """``python train.py --method lora ...`` as a launcher runs it, then --eval_only on its delta."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), *argv(vtab, "lora", out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    top1 = read_results(out)["top1"]
    ev = tmp_path / "eval"
    assert run_train(["--data_dir", vtab, "--dataset", "dsprites_loc", *TINY, "--eval_only", "--checkpoint",
                      str(out / "delta.pth"), "--output_dir", str(ev)]) == 0
    assert read_results(ev)["top1"] == pytest.approx(top1)
    assert torch.load(out / "delta.pth", map_location="cpu", weights_only=True)["method"] == "lora"
