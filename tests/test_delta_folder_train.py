"""Delta folders in the training tools: train.py --delta_folder writes run/delta/ next to delta.pth, --eval_only
and tools/predict.py accept the folder wherever they accept delta.pth (models/hub.py)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import models
from helpers_train import TINY, read_results, run_train, single_thread, vtab_root  # noqa: F401
from models import DTLConfig, create_dtl_model
from models.delta import delta_from_model, read_delta, write_pth
from models.shared_prefix import shared_model_from_deltas
from tools import predict
from cli.flags import UsageError, parse_args


@pytest.fixture(scope="module")
def vtab(tmp_path_factory):
    return vtab_root(tmp_path_factory)


@pytest.fixture(scope="module")
def run(vtab, tmp_path_factory):
    out = tmp_path_factory.mktemp("dfold") / "run"
    rc = run_train(["--data_dir", vtab, "--dataset", "dsprites_loc", *TINY, "--epochs", "1", "--warmup_epochs", "0",
                    "--batch_size", "8", "--fusion_size", "3", "--delta_folder", "--output_dir", out])
    assert rc == 0
    return out


def test_train_writes_the_delta_folder_next_to_delta_pth(run):
    folder = run / "delta"
    assert sorted(os.listdir(folder)) == ["config.json", "delta.safetensors"]
    pth = torch.load(run / "delta.pth", map_location="cpu", weights_only=True)
    tensors = load_file(str(folder / "delta.safetensors"))
    assert set(tensors) == set(pth["delta"]) and all(torch.equal(tensors[k], v) for k, v in pth["delta"].items())
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "dtl_vit_tiny_patch16_224" and cfg["num_classes"] == 16
    block = cfg["dtl"]
    assert block["model_name"] == "vit_tiny_patch16_224" and block["method"] == "dtl+"
    assert block["model_config"] == json.loads(json.dumps(pth["model_config"]))
    assert block["dataset"] == "dsprites_loc" and block["top1"] == pth["top1"]
    assert block["model_kwargs"]["img_size"] == 32


def test_eval_only_accepts_the_folder(run, vtab, tmp_path):
    out = tmp_path / "eval"
    rc = run_train(["--data_dir", vtab, "--dataset", "dsprites_loc", "--num_workers", "0", "--eval_only",
                    "--checkpoint", run / "delta", "--output_dir", out])
    assert rc == 0
    assert read_results(out)["top1"] == read_results(run)["top1"]
    assert read_results(out)["n_trainable"] == read_results(run)["n_trainable"]


def test_delta_folder_is_refused_for_baselines(vtab):
    with pytest.raises(UsageError, match="--delta_folder"):
        parse_args(["--data_dir", vtab, "--dataset", "dsprites_loc", "--method", "lora", "--delta_folder"])


def test_predict_scores_the_random_backbone_delta_as_eval_only(run, vtab, capsys):
    """The run trained on a random backbone: its delta records that (never a hub tag) and its init seed, so
    tools/predict.py --load_path '' rebuilds the same backbone and predicts what --eval_only measured."""
    block = json.loads((run / "delta" / "config.json").read_text())["dtl"]
    assert block["model_spec"]["weights"] == {"kind": "random", "source": None, "fingerprint": None}
    test_list = os.path.join(vtab, "dsprites_loc", "test.txt")
    labels = [int(line.split()[-1]) for line in open(test_list) if line.strip()]
    for delta in (run / "delta.pth", run / "delta"):
        assert predict.main(["--load_path", "", "--deltas", str(delta), "--images", test_list]) == 0
        out = capsys.readouterr()
        assert "older version" not in out.err and "randomly initialised" in out.err
        rows = out.out.strip().splitlines()[1:]
        top1 = 100.0 * sum(int(r.split(",")[1]) == y for r, y in zip(rows, labels)) / len(labels)
        assert top1 == pytest.approx(read_results(run)["top1"])


def test_predict_accepts_delta_folders(tmp_path):
    kw = dict(patch_size=8, embed_dim=32, num_heads=2, depth=4)
    torch.manual_seed(0)
    ref = create_dtl_model("vit_tiny_patch16_224", 4, img_size=32, **kw)
    torch.save(ref.backbone.state_dict(), tmp_path / "bb.pth")
    cfg = DTLConfig(r=2, fusion_size=3, csn_blocks="0-3", add_back_blocks="2-3")
    m = create_dtl_model("vit_tiny_patch16_224", 4, cfg, load_path=str(tmp_path / "bb.pth"), img_size=32, **kw)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    write_pth(delta_from_model(m, dataset="toy"), tmp_path / "toy.pth")
    folder = models.hub.delta_folder_next_to(str(tmp_path / "toy.pth"))
    a, b = read_delta(tmp_path / "toy.pth"), read_delta(folder)
    assert (a.name, a.spec, a.trained_on, a.info) == (b.name, b.spec, b.trained_on, b.info)
    shared = shared_model_from_deltas([b], load_path=str(tmp_path / "bb.pth"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(shared(x)[0], m.eval()(x))
