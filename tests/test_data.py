"""data/: list parsing, the three benchmarks' datasets on generated roots, bad input, transforms, generators."""
import csv
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from data.datasets import DataError, ListFileDataset, parse_list_file
from data.domain_generalization import (
    DG_TARGETS, build_dg_source, build_dg_target, canonical_dg_target, dg_target_list_path,
)
from data.few_shot import FGFS_DATASETS, build_fgfs_dataset, canonical_fgfs_name
from data.synthetic import factors_for, make_dg_root, make_fgfs_root, make_image, make_vtab_root
from data.transforms import (
    DTL_MEAN, DTL_STD, build_transform, normalize_uint8_batch, transform_is_deterministic,
)
from data.vtab import VTAB_GROUPS, VTAB_SPLITS, VTAB_TASKS, build_vtab_dataset, get_vtab_task


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory):
    return make_vtab_root(str(tmp_path_factory.mktemp("vtab")), tasks=("cifar_100", "dsprites_loc", "pets"),
                          n_train=12, n_val=4, n_test=10, img_size=16)


@pytest.fixture(scope="module")
def fgfs_root(tmp_path_factory):
    return make_fgfs_root(str(tmp_path_factory.mktemp("fgfs")), datasets=("food101", "standford-cars"),
                          shots=(1, 2, 4), classes_per_dataset=3, img_size=16)


@pytest.fixture(scope="module")
def dg_root(tmp_path_factory):
    return make_dg_root(str(tmp_path_factory.mktemp("dg")), classes=3, shot=4, img_size=16)


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


def _img(path, size=8, colour=(10, 200, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


# ----------------------------------------------------------------------------------------------- parsing
def test_parse_splits_on_last_whitespace_run(tmp_path):
    p = _write(tmp_path / "l.txt", "\ufeffa/b c.jpg 3\n\n  dir with  spaces/x y z.png\t\t 0  \r\nplain.jpg 9\n\n")
    assert parse_list_file(p, 10) == [("a/b c.jpg", 3), ("dir with  spaces/x y z.png", 0), ("plain.jpg", 9)]
    assert parse_list_file(p, None)[2] == ("plain.jpg", 9)


@pytest.mark.parametrize("line, words", [
    ("just_a_path.jpg", "no label"),
    ("img.jpg three", "not an integer"),
    ("img 1.jpg", "not an integer"),  # a path with a space but no label
    ("img.jpg 1.5", "not an integer"),
    ("img.jpg 10", "outside the class range [0, 10)"),
    ("img.jpg -1", "outside the class range"),
])
def test_parse_bad_line_names_file_and_line(tmp_path, line, words):
    p = _write(tmp_path / "bad list.txt", f"ok.jpg 1\n\n{line}\nok2.jpg 2\n")
    with pytest.raises(DataError) as e:
        parse_list_file(p, 10)
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: ") and words in msg


def test_parse_missing_or_unreadable_list(tmp_path):
    with pytest.raises(DataError, match="list file not found"):
        parse_list_file(str(tmp_path / "nope.txt"), 3)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9.jpg 1\n")
    with pytest.raises(DataError, match="not a UTF-8"):
        parse_list_file(str(bad), 3)


# ----------------------------------------------------------------------------------------------- ListFileDataset
def test_list_dataset_basic_and_errors(tmp_path):
    _img(str(tmp_path / "im" / "a b.png"))
    _img(str(tmp_path / "im" / "c.png"))
    lp = _write(tmp_path / "list.txt", "im/a b.png 0\nim/c.png 2\n")
    ds = ListFileDataset(str(tmp_path), lp, 3)
    assert len(ds) == 2 and ds.targets == [0, 2] and ds.num_classes == 3
    assert ds.samples[0] == (os.path.join(str(tmp_path), "im", "a b.png"), 0)
    img, y = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and y == 0
    assert ds.verify_images() == 0 and ds.num_skipped == 0

    # missing file: error names the file and the list line
    lp2 = _write(tmp_path / "list2.txt", "im/a b.png 0\n\nim/missing.png 1\n")
    with pytest.raises(DataError) as e:
        ListFileDataset(str(tmp_path), lp2, 3)
    assert "missing.png" in str(e.value) and f"{lp2}:3" in str(e.value)
    ds2 = ListFileDataset(str(tmp_path), lp2, 3, skip_bad_images=True)
    assert len(ds2) == 1 and ds2.num_skipped == 1
    # no file check: the dataset builds and fails only when the image is loaded
    ds3 = ListFileDataset(str(tmp_path), lp2, 3, check_files=False)
    with pytest.raises(DataError, match=r"missing\.png.*list2\.txt:3"):
        ds3[1]
    # empty list, missing image folder
    with pytest.raises(DataError, match="no samples"):
        ListFileDataset(str(tmp_path), _write(tmp_path / "empty.txt", "\n\n"), 3)
    with pytest.raises(DataError, match="image folder not found"):
        ListFileDataset(str(tmp_path / "nope"), lp, 3)


def test_corrupt_image_error_and_skip(tmp_path):
    _img(str(tmp_path / "good.jpg"))
    (tmp_path / "bad one.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    with open(tmp_path / "good.jpg", "rb") as f:  # a truncated JPEG
        data = f.read()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    lp = _write(tmp_path / "l.txt", "good.jpg 0\nbad one.jpg 1\ntrunc.jpg 1\n")
    ds = ListFileDataset(str(tmp_path), lp, 2)
    with pytest.raises(DataError) as e:
        ds[1]
    msg = str(e.value)
    assert "bad one.jpg" in msg and f"{os.path.abspath(lp)}:2" in msg and "--skip_bad_images" in msg
    with pytest.raises(DataError, match=r"bad one\.jpg.*l\.txt:2.*2 unreadable"):
        ds.verify_images()
    ds = ListFileDataset(str(tmp_path), lp, 2, skip_bad_images=True)
    assert ds.verify_images() == 2 and ds.num_skipped == 2 and len(ds) == 1
    assert ds.samples[0][0].endswith("good.jpg") and {s[1] for s in ds.skipped} == {2, 3}
    assert ds[0][1] == 0


# ----------------------------------------------------------------------------------------------- VTAB
def test_vtab_task_table_matches_spec():
    assert len(VTAB_TASKS) == 19
    assert [len(VTAB_GROUPS[g]) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    expected = dict(cifar_100=100, caltech101=102, dtd=47, flowers102=102, pets=37, svhn=10, sun397=397,
                    patch_camelyon=2, eurosat=10, resisc45=45, diabetic_retinopathy=5, clevr_count=8, clevr_dist=6,
                    dmlab=6, kitti=4, dsprites_loc=16, dsprites_ori=16, smallnorb_azi=18, smallnorb_ele=9)
    assert {k: t.num_classes for k, t in VTAB_TASKS.items()} == expected
    assert list(VTAB_TASKS) == list(expected)  # the benchmark's order
    folders = {t.name: t.folder for t in VTAB_TASKS.values() if t.folder != t.name}
    assert folders == {"cifar_100": "cifar", "pets": "oxford_iiit_pet", "flowers102": "oxford_flowers102"}


def test_every_launcher_dataset_name_resolves():
    with open(REPO / "train_scripts" / "hparams.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert rows
    for r in rows:
        name, bench = r["dataset"], r["benchmark"]
        if bench == "vtab":
            assert get_vtab_task(name).name == name
        elif bench == "few_shot":
            assert canonical_fgfs_name(name) == name[: -len("-FS")]
        else:
            assert canonical_dg_target(name) == name
    for folder, name in (("cifar", "cifar_100"), ("oxford_iiit_pet", "pets"), ("oxford_flowers102", "flowers102"),
                         ("Clevr-Count", "clevr_count")):
        assert get_vtab_task(folder).name == name
    with pytest.raises(ValueError, match="valid names: cifar_100, caltech101"):
        get_vtab_task("imagenet")
    with pytest.raises(ValueError, match="valid: fgvc-aircraft"):
        canonical_fgfs_name("mnist-FS")
    with pytest.raises(ValueError, match="valid: imagenet"):
        canonical_dg_target("imagenet-c")


def test_vtab_builder_on_generated_root(vtab_root):
    for task in ("cifar_100", "dsprites_loc", "oxford_iiit_pet"):
        t = get_vtab_task(task)
        sets = {s: build_vtab_dataset(vtab_root, task, s) for s in VTAB_SPLITS}
        assert [len(sets[s]) for s in VTAB_SPLITS] == [12, 4, 16, 10]
        assert sets["train800val200"].samples == sets["train800"].samples + sets["val200"].samples
        labels = set(sets["train800val200"].targets) | set(sets["test"].targets)
        assert 0 in labels and t.num_classes - 1 in labels  # spread over the whole class range
        assert all(p.startswith(os.path.join(vtab_root, t.folder) + os.sep) for p, _ in sets["test"].samples)
    x, y = build_vtab_dataset(vtab_root, "cifar_100", "test", transform=build_transform("vtab", False, 24))[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and 0 <= y < 100


def test_vtab_missing_folder_list_and_bad_label(vtab_root, tmp_path):
    with pytest.raises(DataError, match=r"svhn.*not found"):
        build_vtab_dataset(vtab_root, "svhn", "test")
    with pytest.raises(DataError, match="data root not found"):
        build_vtab_dataset(str(tmp_path / "none"), "cifar_100", "test")
    with pytest.raises(ValueError, match="unknown VTAB split"):
        build_vtab_dataset(vtab_root, "cifar_100", "train")
    root = make_vtab_root(str(tmp_path / "v"), tasks=("kitti",), n_train=4, n_val=2, n_test=4, img_size=8)
    os.remove(os.path.join(root, "kitti", "val200.txt"))
    with pytest.raises(DataError, match=r"kitti/val200\.txt.*not found"):
        build_vtab_dataset(root, "kitti", "val200")
    lp = os.path.join(root, "kitti", "test.txt")
    with open(lp, "a") as f:
        f.write("images/test/000000.png 4\n")  # kitti has 4 classes
    with pytest.raises(DataError, match=rf"{lp}:5: label 4 is outside the class range \[0, 4\)"):
        build_vtab_dataset(root, "kitti", "test")


# ----------------------------------------------------------------------------------------------- FGFS
def test_fgfs_builder(fgfs_root):
    for name in ("food101", "food101-FS", "standford-cars-FS"):
        ds_name = canonical_fgfs_name(name)
        C = FGFS_DATASETS[ds_name]
        for k in (1, 2, 4):
            for s in (0, 1, 2):
                ds = build_fgfs_dataset(fgfs_root, name, "train", shot=k, seed=s)
                counts = [n for n in ds.class_counts() if n]
                assert counts == [k] * 3 and ds.num_classes == C
        val = build_fgfs_dataset(fgfs_root, name, "val")
        test = build_fgfs_dataset(fgfs_root, name, "test")
        assert {0, C - 1} <= set(test.targets) and len(val) == 3 and len(test) == 6
        assert any(" " in os.path.basename(p) for p, _ in test.samples)
        assert all(p.startswith(os.path.join(fgfs_root, ds_name) + os.sep) for p, _ in test.samples)
    a = build_fgfs_dataset(fgfs_root, "food101", "train", shot=2, seed=0).samples
    b = build_fgfs_dataset(fgfs_root, "food101", "train", shot=2, seed=1).samples
    assert sorted(a) != sorted(b)  # seeds select different images
    x, _ = build_fgfs_dataset(fgfs_root, "food101", "train", 1, 0, transform=build_transform("few_shot", True, 16))[0]
    assert x.shape == (3, 16, 16)


def test_fgfs_bad_input(fgfs_root, tmp_path):
    with pytest.raises(ValueError, match="needs shot and seed"):
        build_fgfs_dataset(fgfs_root, "food101", "train")
    with pytest.raises(DataError, match=r"num_shot_8\.seed_0: .*not found"):
        build_fgfs_dataset(fgfs_root, "food101", "train", shot=8, seed=0)
    with pytest.raises(DataError, match="few-shot split folder not found"):
        build_fgfs_dataset(str(tmp_path), "food101", "test")
    with pytest.raises(DataError, match=r"oxford-pets.*not found"):
        build_fgfs_dataset(fgfs_root, "oxford-pets", "test")


# ----------------------------------------------------------------------------------------------- DG
def test_dg_builders(dg_root, tmp_path):
    for s in (0, 1, 2):
        src = build_dg_source(dg_root, s, shot=4)
        assert src.num_classes == 1000 and sorted(n for n in src.class_counts() if n) == [4, 4, 4]
        assert {0, 999} <= set(src.targets)
        assert all(p.startswith(os.path.join(dg_root, "imagenet", "images", "train") + os.sep) for p, _ in src.samples)
    for t in DG_TARGETS:
        ds = build_dg_target(dg_root, t)
        assert len(ds) == 6 and {0, 999} <= set(ds.targets)
        base = os.path.join(dg_root, "imagenet", "images", "val") if t == "imagenet" else os.path.join(dg_root, t)
        assert ds.image_root == base
    assert len(build_dg_target(dg_root, "imagenet-a")) == 6
    with pytest.raises(DataError, match=r"num_shot_16\.seed_0.*not found"):
        build_dg_source(dg_root, 0)  # this root only has 4-shot lists
    with pytest.raises(ValueError, match="unknown domain-generalisation target"):
        build_dg_target(dg_root, "imagenet-c")


def test_dg_imagenet_val_list_relative_to_imagenet_folder(dg_root, tmp_path):
    """A val list whose paths start with images/val/ (relative to <root>/imagenet/) is recognised too."""
    import shutil

    root = str(tmp_path / "dg")
    shutil.copytree(dg_root, root)
    lp = dg_target_list_path(root, "imagenet")
    rows = parse_list_file(lp, 1000)
    _write(lp, "".join(f"images/val/{p} {y}\n" for p, y in rows))
    ds = build_dg_target(root, "imagenet")
    assert ds.image_root == os.path.join(root, "imagenet") and len(ds) == len(rows)
    assert ds.verify_images() == 0


# ----------------------------------------------------------------------------------------------- transforms
def _pil(seed=0, size=(70, 50)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_transform_shapes_and_determinism():
    img = _pil()
    for bench in ("vtab", "few_shot", "domain_generalization", "dg", "few-shot"):
        for train in (True, False):
            x = build_transform(bench, train, img_size=32)(img)
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32
            assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
            u = build_transform(bench, train, img_size=32, normalize=False)(img)
            assert u.shape == (3, 32, 32) and u.dtype == torch.uint8
    for train in (True, False):
        t = build_transform("vtab", train, 32)
        assert torch.equal(t(img), t(img)) and transform_is_deterministic("vtab", train)
    assert transform_is_deterministic("few_shot", False) and not transform_is_deterministic("few_shot", True)
    assert not transform_is_deterministic("domain_generalization", True)
    with pytest.raises(ValueError, match="unknown benchmark"):
        build_transform("imagenet", True)


def test_vtab_transform_is_resize_centercrop():
    img = _pil(1, (90, 60))
    t = build_transform("vtab", True, 32)
    ref = img.resize((32, 32), Image.BICUBIC)
    ref = (torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.allclose(t(img), ref, atol=1e-6)


def test_test_transform_resize_256_crop_224():
    t = build_transform("few_shot", False, 224)
    names = [type(x).__name__ for x in t.transforms]
    assert names == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert tuple(t.transforms[0].size) == (256, 256) and t.transforms[0].interpolation.value == "bicubic"
    assert tuple(t.transforms[1].size) == (224, 224)
    assert tuple(build_transform("dg", False, 112).transforms[0].size) == (128, 128)


def test_fgfs_train_transform_is_timm_randaugment_recipe():
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment
    from timm.data.transforms import RandomResizedCropAndInterpolation

    t = build_transform("few_shot", True, 224)
    rrc, flip, ra = t.transforms[:3]
    assert isinstance(rrc, RandomResizedCropAndInterpolation)
    assert rrc.scale == (0.08, 1.0) and rrc.ratio == pytest.approx((3 / 4, 4 / 3)) and rrc.interpolation.value == "bicubic"
    assert type(flip).__name__ == "RandomHorizontalFlip" and flip.p == 0.5
    assert isinstance(ra, RandAugment) and ra.num_layers == 2 and len(ra.ops) == 15
    for op in ra.ops:
        assert op.magnitude == 9 and op.magnitude_std == 0.5 and op.prob == 0.5
        assert op.hparams["translate_const"] == 100 and op.hparams["img_mean"] == (128, 128, 128)
        assert op.kwargs["fillcolor"] == (128, 128, 128) and op.kwargs["resample"] == Image.BICUBIC
    assert "TranslateXRel" in [op.name for op in ra.ops] and "PosterizeIncreasing" in [op.name for op in ra.ops]
    assert [type(x).__name__ for x in t.transforms[3:]] == ["ToTensor", "Normalize"]  # no colour jitter / erasing
    # identical, draw for draw, to timm's own factory with the original arguments
    ref = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                           mean=DTL_MEAN, std=DTL_STD, re_prob=0.0)
    img = _pil(2, (300, 240))
    for s in range(6):
        random.seed(s), np.random.seed(s), torch.manual_seed(s)
        a = t(img)
        random.seed(s), np.random.seed(s), torch.manual_seed(s)
        assert torch.equal(a, ref(img))


def test_uint8_path_matches_normalized_path_exactly():
    img = _pil(3)
    for bench, train in (("vtab", True), ("few_shot", False)):
        f = build_transform(bench, train, 32)(img)
        u = build_transform(bench, train, 32, normalize=False)(img)
        assert torch.equal(normalize_uint8_batch(u.unsqueeze(0))[0], f)
    assert normalize_uint8_batch(u.unsqueeze(0), dtype=torch.float16).dtype == torch.float16
    with pytest.raises(TypeError):
        normalize_uint8_batch(f.unsqueeze(0))


# ----------------------------------------------------------------------------------------------- generators
def test_generators_are_deterministic(tmp_path):
    a = make_vtab_root(str(tmp_path / "a"), tasks=("dmlab",), n_train=3, n_val=1, n_test=2, img_size=8, seed=5)
    b = make_vtab_root(str(tmp_path / "b"), tasks=("dmlab",), n_train=3, n_val=1, n_test=2, img_size=8, seed=5)
    c = make_vtab_root(str(tmp_path / "c"), tasks=("dmlab",), n_train=3, n_val=1, n_test=2, img_size=8, seed=6)
    rel = "dmlab/images/train800/000000.png"
    read = lambda r: open(os.path.join(r, rel), "rb").read()  # noqa: E731
    assert read(a) == read(b) and read(a) != read(c)
    assert open(os.path.join(a, "dmlab/test.txt")).read() == open(os.path.join(b, "dmlab/test.txt")).read()


def _object_features(img: Image.Image) -> np.ndarray:
    """Foreground area, centroid and mean colour (foreground = far from the median background colour)."""
    a = np.asarray(img, dtype=np.float32)
    fg = np.abs(a - np.median(a.reshape(-1, 3), axis=0)).sum(-1) > 90
    if not fg.any():
        return np.zeros(6, np.float32)
    ys, xs = np.nonzero(fg)
    return np.array([fg.mean(), xs.mean() / a.shape[1], ys.mean() / a.shape[0], *(a[fg].mean(0) / 255)], np.float32)


@pytest.mark.parametrize("task, dims", [("dsprites_loc", [1, 2]), ("kitti", [1, 2]), ("dmlab", [3, 4, 5]),
                                        ("clevr_dist", [0])])
def test_shapes_images_are_learnable(task, dims):
    """The label factor is really in the image: nearest class mean on the matching object feature (centroid for
    position, colour, area for size) is far above chance despite the random nuisance factors and pixel noise."""
    C = VTAB_TASKS[task].num_classes
    f = factors_for(C, task)
    rng = np.random.default_rng(0)
    feats = lambda y: _object_features(make_image(y, f, 32, rng))[dims]  # noqa: E731
    train = {y: np.stack([feats(y) for _ in range(10)]) for y in range(C)}
    mu = np.concatenate(list(train.values())).mean(0)
    sd = np.concatenate(list(train.values())).std(0) + 1e-6
    means = np.stack([((train[y] - mu) / sd).mean(0) for y in range(C)])
    correct = total = 0
    for y in range(C):
        for _ in range(5):
            pred = int(np.argmin((((feats(y) - mu) / sd - means) ** 2).sum(1)))
            correct += pred == y
            total += 1
    assert correct / total >= 0.8, (task, correct / total)


def test_synthetic_cli(tmp_path, capsys):
    from tools.make_synthetic_data import main

    assert main(["vtab", str(tmp_path / "v"), "--tasks", "kitti", "--n_train", "4", "--n_val", "2", "--n_test", "3",
                 "--img_size", "8"]) == 0
    assert [len(build_vtab_dataset(str(tmp_path / "v"), "kitti", s)) for s in VTAB_SPLITS] == [4, 2, 6, 3]
    assert main(["dg", str(tmp_path / "d"), "--tasks", "imagenet-r", "--classes", "2", "--img_size", "8"]) == 0
    assert len(build_dg_target(str(tmp_path / "d"), "imagenet-rendition")) == 4
    assert "wrote a synthetic" in capsys.readouterr().out
    # your own data's layout, with every list form: the classes and counts train.py will read
    from data.benchmark import DataRequest
    from data.benchmarks import get_benchmark

    for layout in ("folders", "txt", "csv"):
        root = str(tmp_path / f"f_{layout}")
        assert main(["folder", root, "--classes", "6", "--n_train", "2", "--n_val", "1", "--n_test", "1",
                     "--layout", layout, "--img_size", "8"]) == 0
        plan = get_benchmark("folder").build(DataRequest(
            data_dir=root, dataset="mine", seeds=[0], shot=None, target=None, train_transform=None,
            test_transform=None, need_train=True))
        seed = plan.seeds[0]
        assert plan.num_classes == 6 and "class_5" in plan.class_names, layout
        assert (len(seed.train), len(seed.val), len(seed.tests["test"])) == (12, 6, 6), layout
        # every image is listed under its own class (index labels follow classes.txt's order)
        assert all(os.path.basename(os.path.dirname(p)) == plan.class_names[y] for p, y in seed.train.samples)
