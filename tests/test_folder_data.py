"""Your own data (``--benchmark folder``): image folders with and without val, .txt and .csv lists with and
without a header, class names from folders and from classes.txt, spaces and unicode in names, a class only in
test, the class-count check, the data checker, and runs through train.py and the custom launcher."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.benchmark import DataRequest, check_num_classes
from data.benchmarks import get_benchmark
from data.check import check_data_root
from data.errors import DataError
from data.synthetic import FOLDER_CLASSES, make_folder_root
from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import REPO, TINY, read_results, run_train
from utils.errors import UsageError

FOLDER = get_benchmark("folder")
SORTED = sorted(FOLDER_CLASSES)


def _plan(root, need_train: bool = True, **kw):
    req = DataRequest(data_dir=str(root), dataset="mine", seeds=[0], shot=None, target=None,
                      train_transform=None, test_transform=None, need_train=need_train, **kw)
    return FOLDER.build(req)


def _labels(ds):
    return [y for _, y in ds.samples]


def test_image_folders_without_val(tmp_path):
    root = make_folder_root(str(tmp_path / "r"), n_train=2, n_test=1)
    plan = _plan(root)
    assert plan.num_classes == 4 and plan.class_names == SORTED  # torchvision's rule: sorted folder names
    seed = plan.seeds[0]
    assert seed.val is None and len(seed.train) == 8 and len(seed.tests["test"]) == 4
    path, label = seed.train.samples[0]
    assert os.path.isfile(path) and " ü.png" in path and SORTED[label] in path
    assert FOLDER.detect(root) and plan.dataset == "mine"


def test_image_folders_with_val_select_on_val(tmp_path):
    root = make_folder_root(str(tmp_path / "r"), n_train=2, n_val=1, n_test=1)
    seed = _plan(root).seeds[0]
    assert len(seed.val) == 4 and FOLDER.selects_on_val and FOLDER.default_eval_interval == 10


@pytest.mark.parametrize("layout, header", [("csv", False), ("csv", True), ("txt", False), ("txt", True)])
def test_lists_with_class_names(tmp_path, layout, header):
    classes = FOLDER_CLASSES if layout == "csv" else ("rot", "grün", "blau", "étoile")  # .txt: no spaces in labels
    root = make_folder_root(str(tmp_path / "r"), classes, layout=layout, header=header, n_train=2, n_test=1)
    plan = _plan(root)
    assert plan.class_names == sorted(classes)  # the training list's names, sorted
    train = plan.seeds[0].train
    assert len(train) == 8 and train.list_path.endswith(f"train.{layout}")
    assert train.line_no(0) == (2 if header else 1)  # the header line is not a sample


def test_space_separated_list_takes_the_last_field_as_label(tmp_path):
    root = make_folder_root(str(tmp_path / "r"), layout="txt", names=False, n_train=2, n_test=1)
    plan = _plan(root)
    assert plan.num_classes == 4 and plan.class_names is None  # integer labels, no classes.txt
    assert _labels(plan.seeds[0].tests["test"]) == [0, 1, 2, 3]
    assert all(" ü.png" in p for p, _ in plan.seeds[0].train.samples)


def test_classes_txt_orders_the_classes(tmp_path):
    root = make_folder_root(str(tmp_path / "r"), classes_file=True, n_train=1, n_test=1)
    plan = _plan(root)
    assert plan.class_names == list(FOLDER_CLASSES)  # classes.txt's order, not the sorted folder names
    for path, label in plan.seeds[0].train.samples:
        assert f"/{FOLDER_CLASSES[label]}/" in path
    # integer labels of a list are indices into classes.txt
    lists = make_folder_root(str(tmp_path / "l"), layout="csv", names=False, classes_file=True, n_train=1, n_test=1)
    assert _plan(lists).class_names == list(FOLDER_CLASSES)


def test_quoted_csv_paths_with_commas(tmp_path):
    root = make_folder_root(str(tmp_path / "r"), n_train=1, n_test=1)
    for split in ("train", "test"):
        os.rename(os.path.join(root, split, "étoile"), os.path.join(root, split, "étoile, big"))
    for split in ("train", "test"):
        rows = [f'"{split}/{c}/bild 00 ü.png",{c}' for c in ("red circle", "grün square")]
        rows.append(f'"{split}/étoile, big/bild 00 ü.png","étoile, big"')
        Path(root, f"{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    plan = _plan(root)
    assert plan.class_names == sorted(["red circle", "grün square", "étoile, big"])


def test_a_class_only_in_test_is_refused(tmp_path):
    root = make_folder_root(str(tmp_path / "r"), layout="csv", n_train=1, n_test=1)
    with open(os.path.join(root, "test.csv"), "a", encoding="utf-8") as f:
        f.write('"test/red circle/bild 00 ü.png",zebra\n')
    with pytest.raises(DataError, match=r"test\.csv:5: class 'zebra' is not among the 4 classes \(from the class "
                                        r"names of .*train\.csv\)"):
        _plan(root)
    folders = make_folder_root(str(tmp_path / "f"), n_train=1, n_test=1)
    os.rename(os.path.join(folders, "test", "étoile"), os.path.join(folders, "test", "zebra"))
    with pytest.raises(DataError, match=r"test/zebra: class 'zebra' is not among the 4 classes"):
        _plan(folders)
    report = check_data_root(folders, check_images=False)
    assert not report.ok and any("zebra" in e for e in report.all_errors)


def test_integer_label_beyond_the_training_classes(tmp_path):
    root = make_folder_root(str(tmp_path / "r"), layout="txt", names=False, n_train=1, n_test=1)
    with open(os.path.join(root, "test.txt"), "a", encoding="utf-8") as f:
        f.write("test/étoile/bild 00 ü.png 7\n")
    with pytest.raises(DataError, match=r"test\.txt:5: class index 7 is outside the 4 classes"):
        _plan(root)


@pytest.mark.parametrize("label", ["0_3", "３", "+3"])
def test_labels_are_ascii_digits_only(tmp_path, label):
    root = make_folder_root(str(tmp_path / "r"), layout="txt", names=False, n_train=1, n_test=1)
    with open(os.path.join(root, "test.txt"), "a", encoding="utf-8") as f:
        f.write(f"test/étoile/bild 00 ü.png {label}\n")
    with pytest.raises(DataError, match=r"test\.txt:5: label .* is not a class index \(ASCII digits 0-9\)"):
        _plan(root)


def test_digit_named_folders_are_names_and_ambiguous_list_labels_are_refused(tmp_path):
    root = make_folder_root(str(tmp_path / "r"), classes=[str(i) for i in range(11)], n_train=1, n_test=1)
    plan = _plan(root)
    assert plan.class_names[:3] == ["0", "1", "10"]  # sorted as names
    assert all(f"/{plan.class_names[y]}/" in p for p, y in plan.seeds[0].tests["test"].samples)
    Path(root, "test.txt").write_text("test/2/bild 00 ü.png 2\n", encoding="utf-8")
    with pytest.raises(DataError, match="is both class index 2 and the name of class 3"):
        _plan(root)


def test_a_digit_label_beyond_the_class_indices_is_the_class_of_that_name(tmp_path):
    root = make_folder_root(str(tmp_path / "r"), classes=["0", "1", "2", "10"], n_train=1, n_test=1)
    Path(root, "test.txt").write_text("test/10/bild 00 ü.png 10\ntest/1/bild 00 ü.png 1\n", encoding="utf-8")
    plan = _plan(root)
    assert plan.class_names == ["0", "1", "10", "2"]
    # '10': there is no index 10 of 4 classes, so the name (class 2); '1': index 1 is the class named '1'
    assert [y for _, y in plan.seeds[0].tests["test"].samples] == [2, 1]
    Path(root, "test.txt").write_text("test/2/bild 00 ü.png 2\n", encoding="utf-8")
    with pytest.raises(DataError, match="is both class index 2 and the name of class 3"):
        _plan(root)  # index 2 is class '10', the name '2' is class 3: ambiguous


def test_mixed_labels_bad_csv_and_classes_txt_problems(tmp_path):
    root = make_folder_root(str(tmp_path / "r"), layout="csv", n_train=1, n_test=1)
    with open(os.path.join(root, "train.csv"), "a", encoding="utf-8") as f:
        f.write('"train/étoile/bild 00 ü.png",2\n')
    with pytest.raises(DataError, match=r"train\.csv:5: class index '2' in a list that names classes"):
        _plan(root)
    Path(root, "train.csv").write_text("a.png,x,y\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.csv:1: expected 2 columns"):
        _plan(root)
    folders = make_folder_root(str(tmp_path / "f"), n_train=1, n_test=1)
    Path(folders, "classes.txt").write_text("red circle\n\nétoile\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"classes\.txt:2: empty class name"):
        _plan(folders)
    Path(folders, "classes.txt").write_text("red circle\nétoile\nred circle\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"classes\.txt:3: class 'red circle' is named again"):
        _plan(folders)


def test_missing_split_and_dataset_names(tmp_path):
    root = make_folder_root(str(tmp_path / "r"), n_train=1, n_test=0)
    with pytest.raises(DataError, match="no test split"):
        _plan(root)
    assert FOLDER.canonical_dataset(" my data ü ") == "my data ü"
    with pytest.raises(ValueError, match="plain folder name"):
        FOLDER.canonical_dataset("a/b")


def test_dataset_flag_messages_for_your_own_data(tmp_path, caplog):
    root = make_folder_root(str(tmp_path / "r"), n_train=1, n_test=1)
    argv = ["--data_dir", root, "--benchmark", "folder", *TINY, "--output_dir", str(tmp_path / "out")]
    caplog.clear()
    assert run_train(argv) == 2
    assert "--dataset is required: with --benchmark folder any name works (it only names the run)" in caplog.text
    assert "a VTAB task" not in caplog.text
    for name in ("a/b", ".."):
        caplog.clear()
        assert run_train([*argv, "--dataset", name]) == 2
        assert f"--dataset {name!r} (--benchmark folder): name your data with a plain folder name" in caplog.text
        assert caplog.text.count("--dataset") == 1, caplog.text
    caplog.clear()
    assert run_train(["--data_dir", root, *TINY, "--output_dir", str(tmp_path / "out")]) == 2
    assert "--dataset is required (a VTAB task, a few-shot dataset or a DG target; your own data: --benchmark " \
           "folder and any name)" in caplog.text
    assert not (tmp_path / "out").exists()


def test_duplicates_and_overlap(tmp_path, caplog):
    root = make_folder_root(str(tmp_path / "r"), layout="txt", names=False, n_train=2, n_test=1)
    train = Path(root, "train.txt")
    train.write_text(train.read_text(encoding="utf-8") + train.read_text(encoding="utf-8").splitlines()[0] + "\n",
                     encoding="utf-8")
    caplog.clear()
    _plan(root)
    assert "train.txt:9: " in caplog.text and "1 duplicate line(s)" in caplog.text  # training: a warning
    test = Path(root, "test.txt")
    original = test.read_text(encoding="utf-8")
    test.write_text(original + original.splitlines()[0] + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"test\.txt:5: .* is listed again \(first at line 1"):
        _plan(root)
    test.write_text(original + train.read_text(encoding="utf-8").splitlines()[1] + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="1 image.* also in a training list.*--allow_train_test_overlap"):
        _plan(root)
    _plan(root, allow_overlap=True)  # intended: a warning
    report = check_data_root(root, check_images=False)
    assert not report.ok and "Result: FAILED" in report.format()
    assert any("also in a training list" in e for e in report.all_errors)
    assert any("duplicate line" in w for w in report.all_warnings)
    assert check_data_root(root, check_images=False, allow_overlap=True).ok


def test_check_num_classes(tmp_path):
    plan = _plan(make_folder_root(str(tmp_path / "r"), n_train=1, n_test=1))
    check_num_classes(plan, None)
    check_num_classes(plan, 4)
    with pytest.raises(UsageError, match="--num_classes 5: the data of 'mine' has 4 classes"):
        check_num_classes(plan, 5)


def test_checker_detects_and_reports_the_layout(tmp_path, capsys):
    from tools.check_data import main

    root = make_folder_root(str(tmp_path / "my data"), n_train=2, n_val=1, n_test=1)
    assert main([root]) == 0
    out = capsys.readouterr().out
    assert "Benchmark: folder (detected from the layout)" in out
    assert "4 classes from the folders of" in out and "étoile" in out
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        assert any(line.split()[:2] == [split, str(n)] for line in out.splitlines()), out


def test_checker_warns_of_a_class_without_training_images_as_train_py_does(tmp_path, capsys, caplog):
    from tools.check_data import main

    folders = make_folder_root(str(tmp_path / "f"), n_train=1, n_test=1)
    os.remove(os.path.join(folders, "train", "grün square", "bild 00 ü.png"))  # an empty train/<class>/ folder
    lists = make_folder_root(str(tmp_path / "l"), layout="txt", names=False, n_train=1, n_test=1)
    train = Path(lists, "train.txt")
    train.write_text("".join(line + "\n" for line in train.read_text(encoding="utf-8").splitlines()
                             if not line.endswith(" 1")), encoding="utf-8")  # the labels skip class 1
    for root, shown in ((folders, "'grün square'"), (lists, "1")):
        warning = f"{root}/train{'.txt' if root == lists else ''}: 1 of 4 classes have no training image ({shown})"
        caplog.clear()
        _plan(root)
        assert warning in caplog.text  # train.py's warning
        assert main([root, "--no_check_images"]) == 0  # a warning, not a problem
        out = capsys.readouterr().out
        assert f"  - {warning}" in out and "Result: OK (1 warning(s))" in out, out


def _tiny_args(root, out, *extra):
    return ["--data_dir", root, "--benchmark", "folder", "--dataset", "meine Daten", *TINY, "--epochs", "2",
            "--warmup_epochs", "0", "--batch_size", "4", "--lr", "1e-2", "--output_dir", out, *extra]


def test_train_py_with_val_selects(tmp_path):
    root = make_folder_root(str(tmp_path / "r"), n_train=2, n_val=1, n_test=1)
    out = tmp_path / "out"
    assert run_train(_tiny_args(root, out, "--eval_interval", "1")) == 0
    res = read_results(out)
    assert res["benchmark"] == "folder" and res["dataset"] == "meine Daten"
    assert res["per_seed"][0]["best_epoch"] in (1, 2) and res["per_seed"][0]["n_test_images"] == {"test": 4}


def test_train_py_without_val_and_csv(tmp_path):
    root = make_folder_root(str(tmp_path / "r"), layout="csv", header=True, n_train=2, n_test=1)
    out = tmp_path / "out"
    assert run_train(_tiny_args(root, out)) == 0
    res = read_results(out)
    assert res["benchmark"] == "folder" and res["per_seed"][0]["best_epoch"] is None  # no selection


@pytest.mark.parametrize("data_dir, cwd", [(".", "meine Daten"), ("..", "meine Daten/train"),
                                           ("meine Daten/.", ""), ("./meine Daten/", ""), ("nowhere/x/", "")])
def test_custom_launchers_name_the_run_after_the_resolved_data_folder(tmp_path, data_dir, cwd):
    """DATASET left empty: the name of DATA_DIR's folder, also for DATA_DIR=. or .. (not '.'); the launchers'
    train.py command line is read from a stand-in interpreter."""
    (tmp_path / "meine Daten" / "train").mkdir(parents=True)
    fake, argv_out = tmp_path / "fake_python", tmp_path / "argv.bin"
    fake.write_text('#!/usr/bin/env bash\nprintf \'%s\\0\' "$@" > "$ARGS_OUT"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DATASET", "NPROC", "TORCHRUN_ARGS", "DTL_ROOT")}
    env.update(DATA_DIR=data_dir, LOAD_PATH="", PYTHON=str(fake), ARGS_OUT=str(argv_out))
    for launcher in ("train_dtl.sh", "train_dtl+.sh"):
        proc = subprocess.run(["bash", str(REPO / "train_scripts" / "custom" / launcher)], env=env,
                              cwd=tmp_path / cwd, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        argv = argv_out.read_bytes().decode().split("\0")[:-1]
        assert argv[argv.index("--dataset") + 1] == ("x" if data_dir.startswith("nowhere") else "meine Daten")
        assert argv[argv.index("--data_dir") + 1] == data_dir  # passed on as given


def test_custom_launcher(tmp_path):
    root = make_folder_root(str(tmp_path / "meine Daten"), n_train=2, n_test=1)
    out = tmp_path / "out"
    env = dict(os.environ, DATA_DIR=root, LOAD_PATH="", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("DATASET", None)
    for launcher in ("train_dtl.sh", "train_dtl+.sh"):
        proc = subprocess.run(["bash", str(REPO / "train_scripts" / "custom" / launcher), *TINY, "--epochs", "1",
                               "--warmup_epochs", "0", "--batch_size", "4", "--output_dir", str(out / launcher)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        res = read_results(out / launcher)
        assert res["benchmark"] == "folder" and res["dataset"] == "meine Daten"  # DATASET: DATA_DIR's name
        assert res["method"] == ("dtl+" if "+" in launcher else "dtl")


# ------------------------------------------------------------------- a delta's class names against the data's
SMALL = ["--model", "vit_tiny_patch16_224", "--img_size", "32", "--model_kwargs",
         "embed_dim=32,num_heads=2,depth=4,patch_size=8", "--load_path=", "--epochs", "1", "--warmup_epochs", "0",
         "--num_workers", "0", "--batch_size", "4", "--benchmark", "folder", "--dataset", "mine"]


@pytest.fixture(scope="module")
def abc_delta(tmp_path_factory):
    """A delta trained on classes a, b, c (sorted folder names), and its data root."""
    d = tmp_path_factory.mktemp("abc")
    root = make_folder_root(str(d / "abc"), classes=["a", "b", "c"], n_train=4, n_val=2, n_test=2)
    assert run_train([*SMALL, "--data_dir", root, "--output_dir", str(d / "run")]) == 0
    return str(d / "run" / "delta.pth"), root


@pytest.mark.parametrize("classes, classes_file, says", [
    (["c", "a", "b"], True, "the same class names in another order (label 0 is 'a' in the delta but 'c' in the data"),
    (["x", "y", "z"], False, "other class names (the delta's 'a', 'b', 'c' not in the data; the data's 'x', 'y', "
                             "'z' not in the delta)"),
])
def test_eval_only_refuses_other_class_names_or_order(abc_delta, tmp_path, caplog, classes, classes_file, says):
    """Same class count, other classes: --eval_only would score against the wrong labels; refused (exit 2, one
    line naming the checkpoint and how the names differ) before any run folder; the delta's own data passes."""
    delta, own = abc_delta
    root = make_folder_root(str(tmp_path / "r"), classes=classes, classes_file=classes_file, n_train=1, n_test=1)
    out = tmp_path / "out"
    assert run_train([*SMALL, "--data_dir", root, "--eval_only", "--checkpoint", delta, "--output_dir", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
    assert len(errors) == 1 and f"--checkpoint {delta}" in errors[0] and says in errors[0], errors
    assert not out.exists()
    assert run_train([*SMALL, "--data_dir", own, "--eval_only", "--checkpoint", delta,
                      "--output_dir", str(tmp_path / "own")]) == 0


def test_initial_checkpoint_from_other_classes_is_a_logged_transfer(abc_delta, tmp_path, caplog):
    delta, _ = abc_delta
    root = make_folder_root(str(tmp_path / "xyz"), classes=["x", "y", "z"], n_train=2, n_test=1)
    assert run_train([*SMALL, "--data_dir", root, "--initial_checkpoint", delta, "--output_dir",
                      str(tmp_path / "out")]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "class names" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"--initial_checkpoint {delta}: its head was trained on other "
                                                     f"class names"), warned
    caplog.clear()  # another class count: the head does not fit, refused as before
    four = make_folder_root(str(tmp_path / "four"), n_train=2, n_test=1)
    assert run_train([*SMALL, "--data_dir", four, "--initial_checkpoint", delta, "--output_dir",
                      str(tmp_path / "out4")]) == 2
    assert "head.weight" in caplog.text and not (tmp_path / "out4").exists()
