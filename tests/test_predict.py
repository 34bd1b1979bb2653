"""tools/predict.py: several DTL deltas on one backbone, one pass through the shared prefix, same predictions;
class names and top-k, list/CSV inputs, the backbone check, device errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models import DTLConfig, create_dtl_model, delta_state_dict
from models.delta import delta_from_model, spec_of_model, write_pth
from tools import predict

MODEL = "vit_tiny_patch16_224"
IMG = 32
# A very small ViT (extra backbone settings travel in the delta's spec): 4 x 4 patches, 6 blocks.
KW = dict(patch_size=8, embed_dim=32, num_heads=2, depth=6)
# Two tasks that differ in add-back start, rank, taps and fusion.
TASKS = {
    "taskA": (5, DTLConfig(r=2, fusion_size=0, csn_blocks="0-5", add_back_blocks="3-5")),
    "taskB": (3, DTLConfig(r=4, fusion_size=3, csn_blocks="1,3-5", add_back_blocks="2,4")),
}
NAMES_B = ("cat", "dog", "bird")


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
    torch.manual_seed(1)
    torch.save(create_dtl_model(MODEL, 5, img_size=IMG, **KW).backbone.state_dict(), d / "other.pth")
    models, deltas = {}, []
    for k, (name, (nc, cfg)) in enumerate(TASKS.items()):
        m = create_dtl_model(MODEL, nc, cfg, load_path=str(backbone), img_size=IMG, drop_path_rate=0.1, **KW)
        trained_like(m, k).eval()
        spec = spec_of_model(m, class_names=NAMES_B if name == "taskB" else None)
        deltas.append(write_pth(delta_from_model(m, spec, dataset=name), d / f"{name}.pth"))
        models[name] = m
    rng = np.random.default_rng(0)
    img_dir = d / "images"
    img_dir.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(img_dir / f"im{i}.png")
    return d, str(backbone), deltas, models, img_dir


def _images(img_dir):
    return predict.load_images(sorted(str(p) for p in img_dir.iterdir()), IMG, "vtab")


def test_cli_outputs_class_names_topk_and_compare(setup, tmp_path, capsys):
    d, backbone, deltas, models, img_dir = setup
    out = tmp_path / "pred.json"
    assert predict.main(["--load_path", backbone, "--deltas", *deltas, "--images", str(img_dir), "--output", str(out),
                         "--batch_size", "2", "--topk", "2", "--compare", "--repeats", "1"]) == 0
    err = capsys.readouterr().err
    assert "predictions identical: yes" in err and "images/s" in err and "shared prefix: blocks 0-1" in err
    res = json.loads(out.read_text())
    assert [t["name"] for t in res["tasks"]] == ["taskA", "taskB"] and len(res["predictions"]) == 5
    assert res["tasks"][1]["class_names"] == list(NAMES_B) and res["tasks"][0]["class_names"] is None
    with torch.no_grad():
        probs = models["taskB"](_images(img_dir)).softmax(-1)
    top = probs.topk(2, dim=-1)
    for i, p in enumerate(res["predictions"]):
        b = p["taskB"]
        assert b["class"] == int(top.indices[i, 0]) and b["name"] == NAMES_B[b["class"]]
        assert [e["class"] for e in b["topk"]] == top.indices[i].tolist()
        assert [e["prob"] for e in b["topk"]] == pytest.approx(top.values[i].tolist(), abs=1e-6)
        assert "name" not in p["taskA"]
    # CSV on stdout, top-1: the class name column only for the task that has names
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p} 0\n" for p in sorted(img_dir.iterdir())[:2]))
    assert predict.main(["--load_path", backbone, "--deltas", *deltas, "--images", str(lst)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "image,taskA_class,taskA_prob,taskB_class,taskB_name,taskB_prob" and len(lines) == 3
    assert lines[1].split(",")[4] == NAMES_B[int(lines[1].split(",")[3])]
    # top-k columns
    assert predict.main(["--load_path", backbone, "--deltas", deltas[1], "--images", str(lst), "--topk", "3"]) == 0
    head = capsys.readouterr().out.splitlines()[0].split(",")
    assert head[1:4] == ["taskB_top1_class", "taskB_top1_name", "taskB_top1_prob"] and head[-1] == "taskB_top3_prob"


def test_list_and_csv_inputs(setup, tmp_path):
    d, backbone, deltas, models, img_dir = setup
    imgs = sorted(img_dir.iterdir())
    csv_file = tmp_path / "images.csv"
    csv_file.write_text("path,label\n" + "".join(f"{p},1\n" for p in imgs[:3]))
    assert predict.collect_images([str(csv_file)]) == [str(p) for p in imgs[:3]]
    rel = tmp_path / "rel.lst"
    (tmp_path / "sub").mkdir()
    Image.open(imgs[0]).save(tmp_path / "sub" / "a b.png")
    rel.write_text("image label\nsub/a b.png 3\n")  # a header; a path with a space, a label
    assert predict.collect_images([str(rel)]) == [str(tmp_path / "sub" / "a b.png")]
    bare = tmp_path / "bare.txt"  # no labels, a one-word header
    bare.write_text("image\n" + "".join(f"{p}\n" for p in imgs[:2]))
    assert predict.collect_images([str(bare)]) == [str(p) for p in imgs[:2]]
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{imgs[0]},0\nmissing.png,1\n")
    with pytest.raises(predict.DataError, match=r"missing.png: image not found \(listed at .*bad.csv:2\)"):
        predict.collect_images([str(bad)])
    with pytest.raises(predict.DataError, match="nothere"):
        predict.collect_images([str(tmp_path / "nothere.png")])


def test_plain_tensor_dict_delta(setup, tmp_path, capsys):
    d, backbone, deltas, models, img_dir = setup
    plain = tmp_path / "plain.pth"
    torch.save(delta_state_dict(models["taskB"]), plain)
    assert predict.main(["--load_path", backbone, "--model", MODEL, "--deltas", str(plain),
                         "--images", str(img_dir)]) == 2
    assert "--add_back_blocks" in capsys.readouterr().err
    args = predict.parse_args(["--load_path", backbone, "--model", MODEL, "--img_size", str(IMG), "--deltas",
                               str(plain), "--images", str(img_dir), "--add_back_blocks", "2,4"])
    (td,) = predict.read_task_deltas(args)
    assert (td.spec.num_classes, td.dtl_config().r, td.dtl_config().fusion_size) == (3, 4, 3)
    # a plain dict does not know the backbone's settings (the CLI serves standard backbones): give them here
    td = td.__class__(td.spec.replace(backbone_kwargs=KW), td.tensors, source=td.source, kind=td.kind)
    shared = predict.shared_model_from_deltas([td], load_path=backbone)
    x = _images(img_dir)
    with torch.no_grad():
        assert torch.equal(shared(x)[0], models["taskB"](x))


def test_backbone_mismatch_is_refused_unless_allowed(setup, capsys):
    d, backbone, deltas, models, img_dir = setup
    argv = ["--deltas", *deltas, "--images", str(img_dir)]
    assert predict.main(["--load_path", str(d / "other.pth"), *argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "trained on backbone weights backbone.pth" in err and "other.pth" in err
    assert "--allow_backbone_mismatch" in err
    assert predict.main(["--load_path", "", *argv]) == 2  # a random backbone is another backbone too
    assert "randomly initialised" in capsys.readouterr().err
    assert predict.main(["--load_path", str(d / "other.pth"), "--allow_backbone_mismatch", *argv]) == 0
    assert "--allow_backbone_mismatch: " in capsys.readouterr().err


@pytest.mark.parametrize("device", ["bogus", "cuda:7" if torch.cuda.is_available() else "cuda", "meta"])
def test_device_errors(setup, device, capsys):
    d, backbone, deltas, models, img_dir = setup
    assert predict.main(["--load_path", backbone, "--deltas", deltas[0], "--images", str(img_dir),
                         "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --device {device}")


def test_refusals(setup, tmp_path, capsys):
    d, backbone, deltas, models, img_dir = setup
    ck = torch.load(deltas[0], weights_only=True)

    def refused(name, match, **changes):
        torch.save({k: v for k, v in {**ck, **changes}.items() if k not in ("checksum", "model_spec")},
                   tmp_path / name)
        assert predict.main(["--load_path", backbone, "--deltas", deltas[0], str(tmp_path / name), "--images",
                             str(img_dir)]) == 2
        err = capsys.readouterr().err
        assert match in err, err

    refused("size.pth", "do not share one backbone", model_kwargs={**ck["model_kwargs"], "img_size": 64})
    refused("bb.pth", "do not share one backbone", backbone="vit_small_patch16_224")
    refused("lora.pth", "DTL/DTL+ deltas", method="lora", model_config={"arch": "vit", "num_classes": 5, "r": 4})
    refused("wrong.pth", "missing keys", delta={k: v for k, v in ck["delta"].items() if k != "head.bias"})
    assert predict.main(["--load_path", backbone, "--model", "vit_small_patch16_224", "--deltas", deltas[0],
                         "--images", str(img_dir)]) == 2
    assert "would rebuild another one" in capsys.readouterr().err
