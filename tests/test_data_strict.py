"""Strict list files for every benchmark: labels of ASCII digits only, duplicate lines (a warning in training
lists, refused in test lists), images in both a training and a test list (refused unless allowed), a listed
directory named as such, and an image error inside a DataLoader worker reported in the same one line as
without workers."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from data.benchmark import DataRequest
from data.check import check_data_root
from data.errors import DataError
from data.listfile import parse_list_file
from data.vtab import BENCHMARK as VTAB
from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import REPO, TINY, copy_root, vtab_root


@pytest.fixture(scope="session")
def vtab(tmp_path_factory):
    return vtab_root(tmp_path_factory)


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _plan(root, allow_overlap=False):
    return VTAB.build(DataRequest(data_dir=root, dataset="cifar_100", seeds=[0], shot=None, target=None,
                                  train_transform=None, test_transform=None, need_train=True,
                                  allow_overlap=allow_overlap))


@pytest.mark.parametrize("label", ["0_3", "３", "+3", "٣"])
def test_labels_that_int_reads_are_refused(tmp_path, label):
    lst = tmp_path / "list.txt"
    lst.write_text(f"a.png 1\nb.png {label}\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        parse_list_file(str(lst), 10)
    assert str(e.value).startswith(f"{lst}:2: label '{label}' is not an integer of ASCII digits 0-9")


def test_a_negative_label_is_out_of_range(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("a.png -1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"list.txt:1: label -1 is outside the class range"):
        parse_list_file(str(lst), 10)


def test_duplicates_warn_in_training_and_are_refused_in_test(vtab, tmp_path, caplog):
    root = copy_root(vtab, tmp_path / "root")
    train, test = f"{root}/cifar/train800val200.txt", f"{root}/cifar/test.txt"
    lines = _lines(train)
    _write(train, lines + lines[:2])
    caplog.clear()
    _plan(root)
    assert f"{train}:{len(lines) + 1}: " in caplog.text and "2 duplicate line(s)" in caplog.text
    report = check_data_root(root, tasks=["cifar_100"], check_images=False)
    assert report.ok and any("2 duplicate line(s)" in w for w in report.all_warnings)
    original = _lines(test)
    _write(test, original + original[3:4])
    with pytest.raises(DataError, match=rf"{test}:{len(original) + 1}: .* is listed again \(first at line 4;"):
        _plan(root)
    report = check_data_root(root, tasks=["cifar_100"], check_images=False)
    assert not report.ok and "Result: FAILED" in report.format()


def test_train_test_overlap_is_refused_unless_allowed(vtab, tmp_path, caplog):
    root = copy_root(vtab, tmp_path / "root")
    test = f"{root}/cifar/test.txt"
    _write(test, _lines(test) + _lines(f"{root}/cifar/train800.txt")[:3])
    with pytest.raises(DataError, match=r"test.txt: 3 image\(s\) are also in a training list.*"
                                        r"--allow_train_test_overlap if intended"):
        _plan(root)
    caplog.clear()
    _plan(root, allow_overlap=True)
    assert "also in a training list" in caplog.text
    report = check_data_root(root, tasks=["cifar_100"], check_images=False)
    assert not report.ok and any("also in a training list" in e for e in report.all_errors)
    assert check_data_root(root, tasks=["cifar_100"], check_images=False, allow_overlap=True).ok
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "check_data.py"), root, "--tasks", "cifar_100",
                           "--no_check_images"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Result: FAILED" in proc.stdout and "also in a training list" in proc.stdout


def test_a_listed_directory_is_named_as_one(vtab, tmp_path):
    root = copy_root(vtab, tmp_path / "root")
    test = f"{root}/cifar/test.txt"
    lines = _lines(test)
    os.makedirs(f"{root}/cifar/images/a folder")
    _write(test, ["images/a folder 3"] + lines[1:])
    with pytest.raises(DataError, match="a folder: is a directory, not an image file"):
        _plan(root)
    report = check_data_root(root, tasks=["cifar_100"], check_images=False)
    assert any("is a directory, not an image file" in e for e in report.all_errors)


def test_data_error_unwraps_the_worker_message():
    wrapped = ("Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 3, in f\n    raise DataError(m)\nutils.errors.DataError: /d/a.png: unreadable\n')
    assert str(DataError(wrapped)) == "/d/a.png: unreadable"
    assert str(DataError("plain message")) == "plain message"
    assert str(pickle.loads(pickle.dumps(DataError(wrapped)))) == "/d/a.png: unreadable"


def _truncate_an_image(root):
    """Cut the first training image after its header: PIL opens it, decoding fails in the loader."""
    path = os.path.join(root, "cifar", _lines(f"{root}/cifar/train800val200.txt")[0].rsplit(" ", 1)[0])
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    return path


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_image_error_in_a_worker_is_one_line(vtab, tmp_path, workers):
    root = copy_root(vtab, tmp_path / "root")
    bad = _truncate_an_image(root)
    argv = [sys.executable, str(REPO / "train.py"), "--data_dir", root, "--dataset", "cifar_100", *TINY,
            "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "8", "--load_path", "",
            "--output_dir", str(tmp_path / "out")]
    argv[argv.index("--num_workers") + 1] = workers
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and bad in errors[0] and "unreadable image" in errors[0], out[-3000:]
    assert "Traceback" not in out and "DataLoader worker" not in out
