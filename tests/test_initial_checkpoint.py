"""train.py --initial_checkpoint: a delta, a last.pth (its trainable tensors), a state dict in our layout or in
the original code's layout start the trainable tensors; a file that does not fit fails before the run folder
exists, naming the tensors; the source is recorded in config.yaml and results.json."""
from __future__ import annotations

import os
import re

import pytest
import torch

from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import TINY, kill_after, Killed, load_delta, read_results, run_train, vtab_root


@pytest.fixture(scope="module")
def vtab(tmp_path_factory):
    return vtab_root(tmp_path_factory)


def _argv(root, out, *extra):
    return ["--data_dir", root, "--dataset", "cifar_100", *TINY, "--epochs", "2", "--warmup_epochs", "0",
            "--batch_size", "8", "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def source(vtab, tmp_path_factory):
    """A finished run (its delta) and a run killed after one of two epochs (its last.pth)."""
    d = tmp_path_factory.mktemp("init_src")
    assert run_train(_argv(vtab, d / "done", "--lr", "0.01")) == 0
    with kill_after(0, 1), pytest.raises(Killed):
        run_train(_argv(vtab, d / "killed", "--lr", "0.01", "--seed", "7"))
    return d


def _to_original(delta):
    """Our ViT delta in the original code's key layout, plus some frozen backbone tensors (ignored)."""
    out = {re.sub(r"^side\.taps\.", "lora_dict.", k).replace("side.fusion.conv.weight", "lora_fusion.weight"): v
           for k, v in delta.items()}
    out["blocks.0.norm1.weight"] = torch.ones(192)
    out["pos_embed"] = torch.zeros(1, 5, 192)
    return out


@pytest.mark.parametrize("kind", ["delta", "last", "state_dict", "original"])
def test_every_layout_starts_the_run(vtab, source, tmp_path, kind):
    if kind == "last":
        path = source / "killed" / "last.pth"
        expected = torch.load(path, weights_only=True)["trainer"]["model_delta"]
    else:
        expected = load_delta(source / "done" / "delta.pth")["delta"]
        path = source / "done" / "delta.pth"
        if kind == "state_dict":
            path = tmp_path / "plain.pth"
            torch.save(expected, path)
        elif kind == "original":
            path = tmp_path / "original.pth"
            torch.save({"state_dict": _to_original(expected)}, path)
    # lr 0 (AdamW: no step, no decay): the run ends with exactly the tensors it started from
    out = tmp_path / "run"
    assert run_train(_argv(vtab, out, "--lr", "0", "--epochs", "1", "--initial_checkpoint", str(path))) == 0
    final = load_delta(out / "delta.pth")["delta"]
    assert set(final) == set(expected)
    for k, v in expected.items():
        assert torch.equal(final[k], v), k
    rec = read_results(out)["initial_checkpoint"]
    assert rec["kind"] == kind and rec["path"] == os.path.abspath(path) and len(rec["sha256"]) == 64
    assert f"initial_checkpoint: {os.path.abspath(path) if os.path.isabs(path) else path}" in \
        (out / "config.yaml").read_text()
    # and it trains from there (same flags otherwise, lr > 0): the tensors move away from the start
    out2 = tmp_path / "run2"
    if kind == "delta":
        assert run_train(_argv(vtab, out2, "--lr", "0.01", "--initial_checkpoint", str(path))) == 0
        moved = load_delta(out2 / "delta.pth")["delta"]
        assert not torch.equal(moved["head.weight"], expected["head.weight"])


def _fails(argv, caplog, out, *needles):
    caplog.clear()
    assert run_train(argv) == 2
    for n in needles:
        assert n in caplog.text, (n, caplog.text[-2000:])
    assert not os.path.exists(out / "config.yaml"), "the run folder was written before the error"


def test_mismatches_are_clear_errors_before_the_run(vtab, source, tmp_path, caplog):
    delta = load_delta(source / "done" / "delta.pth")["delta"]
    out = tmp_path / "run"
    bad = dict(delta)
    del bad["side.taps.3.lora_B"]
    bad["side.taps.99.lora_A"] = torch.zeros(2, 192)
    bad["head.weight"] = torch.zeros(16, 192)
    p = tmp_path / "bad.pth"
    torch.save(bad, p)
    _fails(_argv(vtab, out, "--initial_checkpoint", str(p)), caplog, out, str(p), "side.taps.3.lora_B",
           "side.taps.99.lora_A", "head.weight: file (16, 192) vs model (100, 192)")
    # another task's head (dsprites_loc: 16 classes)
    assert run_train(["--data_dir", vtab, "--dataset", "dsprites_loc", *TINY, "--epochs", "1", "--warmup_epochs", "0",
                      "--output_dir", str(tmp_path / "other")]) == 0
    _fails(_argv(vtab, out, "--initial_checkpoint", str(tmp_path / "other" / "delta.pth")), caplog, out,
           "head.weight: file (16, 192) vs model (100, 192)", "head.bias")
    # an original-layout file of another rank
    orig = _to_original({k: (torch.zeros(4, 192) if k.endswith("lora_A") else v) for k, v in delta.items()})
    torch.save(orig, p)
    _fails(_argv(vtab, out, "--initial_checkpoint", str(p)), caplog, out, "(original)",
           "side.taps.0.lora_A: file (4, 192) vs model (2, 192)")
    # not a checkpoint / missing / a finished run's last.pth (no tensors between seeds)
    (tmp_path / "x.pth").write_text("not a torch file")
    _fails(_argv(vtab, out, "--initial_checkpoint", str(tmp_path / "x.pth")), caplog, out, "cannot read it")
    torch.save({"epoch": 3}, p)
    _fails(_argv(vtab, out, "--initial_checkpoint", str(p)), caplog, out, "not a delta, a last.pth or a state dict")
    _fails(_argv(vtab, out, "--initial_checkpoint", str(tmp_path / "none.pth")), caplog, out, "file not found")
    _fails(_argv(vtab, out, "--initial_checkpoint", str(source / "done" / "last.pth")), caplog, out,
           "holds no trainable tensors")
    _fails(["--data_dir", vtab, "--dataset", "cifar_100", *TINY, "--eval_only", "--checkpoint",
            str(source / "done" / "delta.pth"), "--initial_checkpoint", str(source / "done" / "delta.pth"),
            "--output_dir", str(out)], caplog, out, "--initial_checkpoint")


def test_a_delta_of_another_backbone_architecture_is_refused(tmp_path, caplog):
    """An EVA-02 delta into a ViT of the same width and depth: the tensors fit and, on randomly initialised
    backbones, the weights fingerprint cannot tell; the recorded backbone name (family) can. Refused before any
    run folder, naming both; --allow_backbone_mismatch uses it anyway (logged). A ViT delta of the same
    architecture but other timm arguments is refused as well."""
    from data.synthetic import make_folder_root
    from models import create_dtl_model
    from models.delta import delta_from_model, spec_of_model, write_pth

    root = make_folder_root(str(tmp_path / "data"), n_train=2, n_test=1)  # 4 classes
    small = ["--model", "vit_tiny_patch16_224", "--img_size", "32", "--model_kwargs",
             "embed_dim=32,num_heads=2,depth=4,patch_size=8", "--load_path=", "--epochs", "1", "--warmup_epochs", "0",
             "--num_workers", "0", "--batch_size", "4", "--benchmark", "folder", "--data_dir", root, "--dataset", "mine"]
    kw = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2)
    eva = create_dtl_model("eva02_tiny_patch14_224", 4, **kw)
    path = write_pth(delta_from_model(eva, spec_of_model(eva)), tmp_path / "eva.pth")
    out = tmp_path / "out"
    assert run_train([*small, "--initial_checkpoint", path, "--output_dir", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
    assert len(errors) == 1 and "eva02_tiny_patch14_224 backbone (family eva)" in errors[0], errors
    assert "vit_tiny_patch16_224 (family vit)" in errors[0] and "--allow_backbone_mismatch" in errors[0]
    assert not out.exists()
    caplog.clear()
    assert run_train([*small, "--initial_checkpoint", path, "--allow_backbone_mismatch", "--output_dir", str(out)]) == 0
    assert "--allow_backbone_mismatch: --initial_checkpoint" in caplog.text and "family eva" in caplog.text
    caplog.clear()
    vit = create_dtl_model("vit_tiny_patch16_224", 4, **{**kw, "num_heads": 4})  # same tensor shapes
    path = write_pth(delta_from_model(vit, spec_of_model(vit)), tmp_path / "vit4.pth")
    assert run_train([*small, "--initial_checkpoint", path, "--output_dir", str(tmp_path / "out4")]) == 2
    assert "num_heads=4 vs 2" in caplog.text


def test_eval_only_of_a_finished_runs_last_pth_names_its_delta(vtab, source, tmp_path, caplog):
    """A finished single-seed run's last.pth holds no tensors: the error names the delta.pth beside it (not a
    delta_seed<k>.pth that a single-seed run never writes)."""
    out = tmp_path / "out"
    assert run_train(["--data_dir", vtab, "--dataset", "cifar_100", *TINY, "--eval_only", "--checkpoint",
                      str(source / "done" / "last.pth"), "--output_dir", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
    assert len(errors) == 1 and f"use {source / 'done' / 'delta.pth'} instead" in errors[0], errors
    assert "delta_seed" not in errors[0] and not out.exists()
