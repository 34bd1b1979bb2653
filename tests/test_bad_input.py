"""Bad input stops train.py with a clear message (naming the file / line / flag), exit status 2, before any
model is built, and leaves no file that could be mistaken for a result."""
from __future__ import annotations

import os

import pytest
import torch

from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import TINY, copy_root, fgfs_root, read_results, result_files, run_train, vtab_root
from utils.checkpoint import save_checkpoint


@pytest.fixture(scope="session")
def vtab(tmp_path_factory):
    return vtab_root(tmp_path_factory)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if train.py gets as far as building a model."""
    import train

    def forbidden(*a, **k):
        raise AssertionError("the model was built before the bad input was reported")

    monkeypatch.setattr(train, "build_model", forbidden)


def _argv(root, out, *extra):
    return ["--data_dir", root, "--dataset", "cifar_100", *TINY, "--epochs", "1", "--warmup_epochs", "0",
            "--batch_size", "8", "--output_dir", out, *extra]


def _fails(argv, caplog, *needles):
    caplog.clear()
    assert run_train(argv) == 2
    for n in needles:
        assert n in caplog.text, (n, caplog.text[-2000:])


def _edit_line(path, line_no, new_text):
    lines = open(path).read().splitlines()
    lines[line_no - 1] = new_text
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def test_missing_data_folder(tmp_path, caplog, no_model):
    out = tmp_path / "out"
    _fails(_argv(str(tmp_path / "nowhere"), out), caplog, str(tmp_path / "nowhere"), "not found")
    assert not out.exists()


def test_missing_list_file(vtab, tmp_path, caplog, no_model):
    root = copy_root(vtab, tmp_path / "root")
    os.remove(f"{root}/cifar/test.txt")
    out = tmp_path / "out"
    _fails(_argv(root, out), caplog, f"{root}/cifar/test.txt", "not found")
    assert not out.exists()


@pytest.mark.parametrize("line, needle", [
    ("images/train800/000000.png", "no label"),
    ("images/train800/000000.png three", "not an integer"),
    ("images/train800/000000.png 100", "outside the class range"),
    ("images/train800/000000.png -1", "outside the class range"),
])
def test_bad_list_lines(vtab, tmp_path, caplog, no_model, line, needle):
    root = copy_root(vtab, tmp_path / "root")
    _edit_line(f"{root}/cifar/train800val200.txt", 3, line)
    out = tmp_path / "out"
    _fails(_argv(root, out), caplog, f"{root}/cifar/train800val200.txt:3", needle)
    assert not out.exists()


def _image_of_line(root, list_name, line_no):
    rel = open(f"{root}/cifar/{list_name}").read().splitlines()[line_no - 1].rsplit(" ", 1)[0]
    return os.path.join(root, "cifar", rel)


def test_missing_image_names_file_and_line(vtab, tmp_path, caplog, no_model):
    root = copy_root(vtab, tmp_path / "root")
    img = _image_of_line(root, "test.txt", 5)
    os.remove(img)
    _fails(_argv(root, tmp_path / "out"), caplog, img, "test.txt:5", "not found")
    assert not (tmp_path / "out").exists()


def test_corrupt_image_names_file_and_line(vtab, tmp_path, caplog, no_model):
    root = copy_root(vtab, tmp_path / "root")
    img = _image_of_line(root, "train800val200.txt", 7)
    with open(img, "wb") as f:
        f.write(b"this is not a png")
    _fails(_argv(root, tmp_path / "out"), caplog, img, "train800val200.txt:7", "--skip_bad_images")
    assert not (tmp_path / "out").exists()


def test_image_truncated_after_the_header_fails_during_loading(vtab, tmp_path, caplog):
    """The start-up check reads headers only; an image cut after its header fails when loaded, with the same
    kind of message and no result files."""
    root = copy_root(vtab, tmp_path / "root")
    img = _image_of_line(root, "train800val200.txt", 2)
    data = open(img, "rb").read()
    with open(img, "wb") as f:
        f.write(data[:60])
    out = tmp_path / "out"
    _fails(_argv(root, out), caplog, img, "train800val200.txt:2")
    assert result_files(out) == []


def test_skip_bad_images_skips_and_reports(vtab, tmp_path, caplog):
    root = copy_root(vtab, tmp_path / "root")
    os.remove(_image_of_line(root, "test.txt", 2))
    with open(_image_of_line(root, "train800val200.txt", 4), "wb") as f:
        f.write(b"garbage")
    out = tmp_path / "out"
    caplog.clear()
    assert run_train(_argv(root, out, "--skip_bad_images")) == 0
    res = read_results(out)
    assert res["skipped_images"] == 2
    assert res["n_test_images"] == {"test": 22}
    assert "skipped 1 missing image" in caplog.text and "skipped 1 unreadable image" in caplog.text


def test_unknown_task_name(vtab, tmp_path, caplog, no_model):
    _fails(["--data_dir", vtab, "--dataset", "cifar_1000", "--output_dir", tmp_path / "o"], caplog,
           "cifar_1000", "unknown dataset")
    _fails(["--data_dir", vtab, "--benchmark", "vtab", "--dataset", "cifar_1000", "--output_dir", tmp_path / "o"],
           caplog, "unknown VTAB-1k task 'cifar_1000'", "cifar_100")
    assert not (tmp_path / "o").exists()


def test_unknown_dg_target_and_missing_shot_list(tmp_path_factory, tmp_path, caplog, no_model):
    fgfs = fgfs_root(tmp_path_factory)
    _fails(["--data_dir", fgfs, "--dataset", "food101-FS", "--shot", "3", *TINY, "--output_dir", tmp_path / "o"],
           caplog, "train_meta.list.num_shot_3.seed_0", "not found")
    _fails(["--data_dir", fgfs, "--benchmark", "domain_generalization", "--dataset", "imagenet-x",
            "--output_dir", tmp_path / "o"], caplog, "imagenet-x")
    assert not (tmp_path / "o").exists()


def test_missing_pretrained_weights(vtab, tmp_path, caplog):
    out = tmp_path / "out"
    _fails(_argv(vtab, out, "--load_path", str(tmp_path / "ViT-B_16.npz")), caplog, "ViT-B_16.npz", "--load_path")
    assert result_files(out) == []


@pytest.fixture(scope="module")
def trained_delta(vtab, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_ck") / "run"
    assert run_train(_argv(vtab, out)) == 0
    return out / "delta.pth"


def test_checkpoint_with_wrong_class_count(trained_delta, vtab, tmp_path, caplog):
    out = tmp_path / "ev"
    _fails(["--data_dir", vtab, "--dataset", "dsprites_loc", "--num_workers", "0", "--eval_only", "--checkpoint",
            trained_delta, "--output_dir", out], caplog, str(trained_delta), "100 classes", "dsprites_loc has 16")
    assert result_files(out) == []


def test_checkpoint_whose_config_does_not_match_its_tensors(trained_delta, vtab, tmp_path, caplog):
    ck = torch.load(trained_delta, weights_only=True)
    ck["model_config"]["dtl"]["fusion_size"] = 3  # claims DTL+, but holds no convolution
    del ck["model_spec"]  # the layout before model specs (with one, the spec and model_config disagree: refused too)
    bad = tmp_path / "bad_delta.pth"
    save_checkpoint(ck, bad)  # a consistent file (its checksum rewritten) whose configuration lies
    out = tmp_path / "ev"
    _fails(["--data_dir", vtab, "--dataset", "cifar_100", "--num_workers", "0", "--eval_only", "--checkpoint", bad,
            "--output_dir", out], caplog, str(bad), "missing keys", "side.fusion.conv.weight")
    assert result_files(out) == []


def test_not_a_checkpoint(vtab, tmp_path, caplog, no_model):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    _fails(["--data_dir", vtab, "--dataset", "cifar_100", "--eval_only", "--checkpoint", junk,
            "--output_dir", tmp_path / "ev"], caplog, str(junk), "cannot read")
    _fails(["--data_dir", vtab, "--dataset", "cifar_100", "--eval_only", "--checkpoint", tmp_path / "none.pth",
            "--output_dir", tmp_path / "ev"], caplog, "none.pth", "not found")
    assert not (tmp_path / "ev").exists()


def test_training_set_smaller_than_a_batch(vtab, tmp_path, caplog, no_model):
    out = tmp_path / "out"
    _fails(_argv(vtab, out, "--batch_size", "64"), caplog, "train800val200.txt", "fewer than one batch")
    assert not out.exists()


def test_output_dir_of_another_run_is_refused(trained_delta, vtab, tmp_path, caplog, no_model):
    run_dir = trained_delta.parent
    before = sorted(os.listdir(run_dir))
    _fails(_argv(vtab, run_dir), caplog, "already holds a run", "--resume")
    _fails(["--data_dir", vtab, "--dataset", "cifar_100", "--eval_only", "--checkpoint", trained_delta,
            "--output_dir", run_dir], caplog, "already holds a run")
    assert sorted(os.listdir(run_dir)) == before


def test_only_user_errors_exit_2(vtab, tmp_path, caplog, monkeypatch):
    """A setting the model cannot take is bad input (exit 2, the flag named); an error inside the program is a
    bug and keeps its exception and traceback instead of looking like a bad flag."""
    _fails(_argv(vtab, tmp_path / "a", "--lora_before_blocks", "0-30"), caplog, "cannot build --model", "30")
    import engine.setup

    def buggy(*a, **k):
        raise RuntimeError("a bug in a model")

    monkeypatch.setattr(engine.setup, "create_tuned_model", buggy)
    with pytest.raises(RuntimeError, match="a bug in a model"):
        run_train(_argv(vtab, tmp_path / "b"))
