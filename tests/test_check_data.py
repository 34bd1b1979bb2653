"""tools/check_data.py and data/check.py on good and broken roots of the three layouts."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from data.check import check_data_root, detect_benchmark
from data.datasets import DataError
from data.synthetic import make_dg_root, make_fgfs_root, make_vtab_root
from tools.check_data import main


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("roots")
    return {
        "vtab": make_vtab_root(str(base / "vtab"), tasks=("cifar_100", "clevr_count"), n_train=8, n_val=4,
                               n_test=6, img_size=8),
        "few_shot": make_fgfs_root(str(base / "fgfs"), datasets=("oxford-pets",), classes_per_dataset=2,
                                   img_size=8),
        "domain_generalization": make_dg_root(str(base / "dg"), classes=2, img_size=8),
    }


def _copy(src, tmp_path, name="root"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("bench", ["vtab", "few_shot", "domain_generalization"])
def test_good_roots_pass_and_are_detected(roots, capsys, bench):
    assert detect_benchmark(roots[bench]) == bench
    rc, out = _run(capsys, roots[bench])
    assert rc == 0, out
    assert f"Benchmark: {bench} (detected from the layout)" in out and "Result: OK" in out
    assert "Images: decoded" in out  # small roots are decoded by default
    rep = check_data_root(roots[bench])
    assert rep.ok and rep.lists and all(r.n_samples > 0 for r in rep.lists)


def test_report_counts(roots, capsys):
    rc, out = _run(capsys, roots["vtab"], "--tasks", "cifar,clevr_count", "--no_check_images")
    assert rc == 0
    assert "cifar_100 (100 classes)" in out and "clevr_count (8 classes)" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("    ")}
    assert "12 images" in lines["train800val200"] and "6 images" in lines["test"]
    assert "not decoded" in out
    rep = check_data_root(roots["few_shot"], check_images=False)
    splits = [r.split for r in rep.lists]
    assert len(splits) == 17 and "train 16-shot seed 2" in splits and "val" in splits and "test" in splits
    assert rep.images_decoded is None


def test_broken_vtab_root_lists_every_problem(roots, tmp_path, capsys):
    root = _copy(roots["vtab"], tmp_path)
    test_list = os.path.join(root, "cifar", "test.txt")
    with open(test_list, "a") as f:
        f.write("images/test/000001.png 100\nno_label_here\nimages/test/000002.png x\n")
    with open(os.path.join(root, "cifar", "images", "test", "000003.png"), "wb") as f:
        f.write(b"garbage bytes, not a png")
    os.remove(os.path.join(root, "clevr_count", "images", "train800", "000000.png"))
    os.remove(os.path.join(root, "clevr_count", "val200.txt"))
    rc, out = _run(capsys, root)
    assert rc == 1, out
    assert f"{test_list}:7: label 100 is outside the class range [0, 100)" in out
    assert f"{test_list}:8: expected '<relative/path> <integer label>'" in out
    assert f"{test_list}:9: label 'x' is not an integer" in out
    assert "000003.png: unreadable image" in out and f"(listed at {test_list}:4)" in out
    assert "clevr_count/images/train800/000000.png: image file not found (listed at" in out
    assert "clevr_count/val200.txt: list file not found" in out
    assert "Result: FAILED" in out
    # without decoding, the corrupt image is not found but everything else is
    rc, out = _run(capsys, root, "--no_check_images")
    assert rc == 1 and "unreadable" not in out and "label 100" in out


def test_broken_few_shot_and_dg_roots(roots, tmp_path, capsys):
    root = _copy(roots["few_shot"], tmp_path, "fs")
    lp = os.path.join(root, "few-shot_split", "oxford-pets", "annotations", "train_meta.list.num_shot_4.seed_1")
    with open(lp) as f:
        lines = f.read().splitlines()
    with open(lp, "w") as f:
        f.write("\n".join(lines[:-1]) + "\n")  # one class now has 3 images in a 4-shot list: a warning
    os.remove(os.path.join(root, "few-shot_split", "oxford-pets", "annotations", "test_meta.list"))
    rc, out = _run(capsys, root)
    assert rc == 1 and "test_meta.list: list file not found" in out
    assert "expected 4 images per class, 1 class(es) differ" in out
    root = _copy(roots["domain_generalization"], tmp_path, "dg")
    with open(os.path.join(root, "imagenet-sketch", "annotations", "val_meta.list"), "a") as f:
        f.write("images/n00000000/sketch_0.JPEG 1000\n")
    rc, out = _run(capsys, root, "--tasks", "imagenet-sketch", "imagenet-r")
    assert rc == 1 and "label 1000 is outside the class range [0, 1000)" in out
    assert "imagenet-rendition (target)" in out and "imagenetv2" not in out


def test_bad_usage_and_undetectable_roots(roots, tmp_path, capsys):
    rc, out = _run(capsys, roots["vtab"], "--tasks", "mnist")
    assert rc == 1 and "unknown VTAB-1k task 'mnist'" in out
    rc, out = _run(capsys, roots["vtab"], "--tasks", "svhn")
    assert rc == 1 and "data folder of VTAB task 'svhn' not found" in out
    rc, out = _run(capsys, os.path.join(roots["vtab"], "cifar"))
    assert rc == 1 and "looks like ONE VTAB task folder" in out
    rc, out = _run(capsys, tmp_path)
    assert rc == 1 and "cannot tell the benchmark" in out and "--benchmark" in out
    rc, out = _run(capsys, tmp_path / "missing")
    assert rc == 1 and "data root not found" in out
    rc, out = _run(capsys, roots["vtab"], "--benchmark", "few_shot")
    assert rc == 1 and "few-shot split folder not found" in out
    with pytest.raises(DataError):
        detect_benchmark(str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main([roots["vtab"], "--benchmark", "imagenet"])
    assert e.value.code == 2


def test_cli_runs_as_a_script(roots):
    p = subprocess.run([sys.executable, str(REPO / "tools" / "check_data.py"), roots["domain_generalization"]],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Result: OK" in p.stdout, p.stdout + p.stderr
