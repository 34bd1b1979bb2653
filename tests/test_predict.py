"""tools/predict.py: several DTL deltas on one backbone, one pass through the shared prefix, same predictions."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models import DTLConfig, create_dtl_model, delta_state_dict
from models.pretrained import CheckpointError
from tools import predict
from utils.checkpoint import make_delta_checkpoint

MODEL = "vit_tiny_patch16_224"
IMG = 32
# A very small ViT (extra backbone settings travel in the delta's model_kwargs): 4 x 4 patches, 6 blocks.
KW = dict(patch_size=8, embed_dim=32, num_heads=2, depth=6)
# Two tasks that differ in add-back start, rank, taps and fusion.
TASKS = {
    "taskA": (5, DTLConfig(r=2, fusion_size=0, csn_blocks="0-5", add_back_blocks="3-5")),
    "taskB": (3, DTLConfig(r=4, fusion_size=3, csn_blocks="1,3-5", add_back_blocks="2,4")),
}


def trained_like(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(("side.", "head.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    ref = create_dtl_model(MODEL, 5, img_size=IMG, **KW)
    backbone = d / "backbone.pth"
    torch.save(ref.backbone.state_dict(), backbone)
    models, deltas = {}, []
    for k, (name, (nc, cfg)) in enumerate(TASKS.items()):
        m = create_dtl_model(MODEL, nc, cfg, load_path=str(backbone), img_size=IMG, **KW)
        trained_like(m, k).eval()
        ck = make_delta_checkpoint(delta_state_dict(m), m.model_config(), cfg.method, MODEL,
                                   {"img_size": IMG, "drop_path_rate": 0.1, **KW}, dataset=name)
        path = d / f"{name}.pth"
        torch.save(ck, path)
        models[name] = m
        deltas.append(str(path))
    rng = np.random.default_rng(0)
    img_dir = d / "images"
    img_dir.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(img_dir / f"im{i}.png")
    return d, str(backbone), deltas, models, img_dir


def test_shared_prefix_equals_separate_models(setup):
    d, backbone, deltas, models, img_dir = setup
    shared, name, size = predict.build_shared_model([predict.read_task_delta(p) for p in deltas], None, backbone, None)
    assert (name, size) == (MODEL, IMG)
    assert shared.resume == 2  # the earliest add-back among the tasks
    assert shared.record == [0, 1, 2]  # taps of both tasks before block 2, and block 2
    assert shared.tasks[0].backbone is shared.tasks[1].backbone
    x = predict.load_images(predict.collect_images([str(img_dir)]), IMG, "vtab")
    out = shared(x)
    for logits, (task, model) in zip(out, models.items()):
        with torch.no_grad():
            assert torch.equal(logits, model(x)), task  # independent full models: bit-identical
    assert not torch.equal(out[0][:, :3], out[1])


def test_cli_outputs_and_compare(setup, tmp_path, capsys):
    d, backbone, deltas, models, img_dir = setup
    out = tmp_path / "pred.json"
    assert predict.main(["--load_path", backbone, "--deltas", *deltas, "--images", str(img_dir), "--output", str(out),
                         "--batch_size", "2", "--compare", "--repeats", "1"]) == 0
    err = capsys.readouterr().err
    assert "predictions identical: yes" in err and "images/s" in err and "shared prefix: blocks 0-1" in err
    res = json.loads(out.read_text())
    assert [t["name"] for t in res["tasks"]] == ["taskA", "taskB"] and len(res["predictions"]) == 5
    x = predict.load_images(sorted(str(p) for p in img_dir.iterdir()), IMG, "vtab")
    with torch.no_grad():
        want = models["taskB"](x).argmax(-1).tolist()
    assert [p["taskB"]["class"] for p in res["predictions"]] == want
    # CSV on stdout, from a .txt list with labels
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p} 0\n" for p in sorted(img_dir.iterdir())[:2]))
    assert predict.main(["--load_path", backbone, "--deltas", *deltas, "--images", str(lst)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "image,taskA_class,taskA_prob,taskB_class,taskB_prob" and len(lines) == 3


def test_plain_tensor_dict_delta(setup, tmp_path, capsys):
    d, backbone, deltas, models, img_dir = setup
    plain = tmp_path / "plain.pth"
    torch.save(delta_state_dict(models["taskB"]), plain)
    assert predict.main(["--load_path", backbone, "--model", MODEL, "--img_size", str(IMG), "--deltas", str(plain),
                         "--images", str(img_dir)]) == 2
    assert "--add_back_blocks" in capsys.readouterr().err
    td = predict.read_task_delta(str(plain), "2,4")
    assert (td.num_classes, td.dtl.r, td.dtl.fusion_size) == (3, 4, 3)
    td.extra_kwargs = KW  # a plain dict does not know the backbone's settings (the CLI serves standard backbones)
    shared, _, _ = predict.build_shared_model([td], MODEL, backbone, IMG)
    x = predict.load_images(predict.collect_images([str(img_dir)]), IMG, "vtab")
    with torch.no_grad():
        assert torch.equal(shared(x)[0], models["taskB"](x))


def test_refusals(setup, tmp_path):
    d, backbone, deltas, models, img_dir = setup
    ck = torch.load(deltas[0], weights_only=True)
    bad_size = dict(ck, model_kwargs={"img_size": 64})
    torch.save(bad_size, tmp_path / "size.pth")
    with pytest.raises(CheckpointError, match="different image sizes"):
        predict.build_shared_model([predict.read_task_delta(p) for p in (deltas[0], str(tmp_path / "size.pth"))],
                                   None, backbone, None)
    torch.save(dict(ck, backbone="vit_small_patch16_224"), tmp_path / "bb.pth")
    with pytest.raises(CheckpointError, match="different backbones"):
        predict.build_shared_model([predict.read_task_delta(p) for p in (deltas[0], str(tmp_path / "bb.pth"))],
                                   None, backbone, None)
    torch.save(dict(ck, method="lora"), tmp_path / "lora.pth")
    with pytest.raises(CheckpointError, match="DTL/DTL\\+ deltas"):
        predict.read_task_delta(str(tmp_path / "lora.pth"))
    wrong = dict(ck, delta={k: v for k, v in ck["delta"].items() if k != "head.bias"})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="wrong.pth.*missing keys.*head.bias"):
        predict.build_shared_model([predict.read_task_delta(str(tmp_path / "wrong.pth"))], None, backbone, None)
    with pytest.raises(FileNotFoundError, match="nothere"):
        predict.collect_images([str(tmp_path / "nothere.png")])
