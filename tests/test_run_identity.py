"""A run's identity on resume and before it starts (issue 20: items 4, 5 and 6): a resume whose images changed
under byte-identical lists is refused naming the first changed image; a few-shot resume whose finished seed lost
its staged delta is refused at once (before any training); an input size or a backbone argument the backbone
cannot take is one line, exit 2, and no run folder."""
from __future__ import annotations

import hashlib
import os
import shutil
import time

import pytest

from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import TINY, Killed, copy_root, fgfs_root, kill_after, result_files, run_train, vtab_root


@pytest.fixture(scope="module")
def vtab(tmp_path_factory):
    return vtab_root(tmp_path_factory)


@pytest.fixture(scope="module")
def fgfs(tmp_path_factory):
    return fgfs_root(tmp_path_factory)


def _argv(root, out, *extra):
    return ["--data_dir", root, "--dataset", "cifar_100", *TINY, "--epochs", "2", "--warmup_epochs", "0",
            "--batch_size", "8", "--lr", "1e-2", "--output_dir", out, *extra]


def _md5s(folder):
    return {os.path.relpath(os.path.join(d, n), folder): hashlib.md5(open(os.path.join(d, n), "rb").read()).hexdigest()
            for d, _, names in os.walk(folder) for n in names if n != ".lock"}


def test_resume_with_replaced_images_is_refused_naming_the_image(vtab, tmp_path, caplog):
    root = copy_root(vtab, tmp_path / "root")
    out = tmp_path / "run"
    with kill_after(0, 1), pytest.raises(Killed):
        run_train(_argv(root, out))
    train_list = next(os.path.join(d, "train800val200.txt") for d, _, f in os.walk(root) if "train800val200.txt" in f)
    first = open(train_list).readline().split()[0]
    image = os.path.join(os.path.dirname(train_list), first)
    lists_before = open(train_list, "rb").read()
    shutil.copyfile(image, image + ".bak")
    with open(image, "ab") as f:  # the same list, another image behind its first line
        f.write(b"\0" * 16)
    assert open(train_list, "rb").read() == lists_before
    before = _md5s(out)
    caplog.clear()
    assert run_train(_argv(root, out, "--resume", out / "last.pth")) == 2
    err = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
    assert len(err) == 1 and "trained on other data" in err[0], caplog.text
    assert "seed 0 train: image 1" in err[0] and first in err[0]
    assert _md5s(out) == before  # nothing of the interrupted run changed

    os.replace(image + ".bak", image)  # the original bytes, but a newer modification time: still refused
    os.utime(image, (time.time() + 60, time.time() + 60))
    assert run_train(_argv(root, out, "--resume", out / "last.pth")) == 2


def _fs_argv(root, out):
    return ["--data_dir", root, "--dataset", "food101-FS", "--shot", "2", *TINY, "--epochs", "1",
            "--warmup_epochs", "1", "--batch_size", "4", "--lr", "1e-2", "--eval_interval", "2", "--output_dir", out]


def test_few_shot_resume_without_a_finished_seeds_delta_is_refused_at_once(fgfs, tmp_path, caplog, monkeypatch):
    import train

    out = tmp_path / "cut"
    with kill_after(1, 1), pytest.raises(Killed):
        run_train(_fs_argv(fgfs, out))
    staged = out / "partial" / "delta_seed0.pth"
    assert staged.is_file()
    os.remove(staged)
    built = []
    monkeypatch.setattr(train, "build_model", lambda *a, **k: built.append(1))
    caplog.clear()
    assert run_train(_fs_argv(fgfs, out) + ["--resume", out / "last.pth"]) == 2
    assert built == []  # refused before any model was built or trained
    assert "delta_seed0.pth: the delta of finished seed 0 is missing" in caplog.text
    assert result_files(out) == []


@pytest.mark.parametrize("extra, says", [
    (["--img_size", "8"], "--img_size 8 does not fit --model vit_tiny_patch16_224"),
    (["--model_kwargs", "embed_dim=-4"], "--model_kwargs embed_dim=-4"),
    # a launcher's block ranges on a shallower backbone: the error names the original's flag, not only the setting
    (["--model_kwargs", "depth=4", "--lora_before_blocks", "0-11"],
     "csn_blocks contains [4, 5, 6, 7, 8, 9, 10, 11], but the backbone has 4 blocks (valid: 0-3) "
     "(csn_blocks: --lora_before_blocks)"),
])
def test_model_settings_the_backbone_cannot_take_are_one_line(vtab, tmp_path, caplog, extra, says):
    out = tmp_path / "run"
    caplog.clear()
    assert run_train(_argv(vtab, out, *extra)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and says in errors[0] and "\n" not in errors[0], errors
    assert not out.exists()


def test_resume_with_another_class_order_is_refused(tmp_path, caplog):
    """Your own data: a classes.txt written (or edited) between the interruption and the resume reorders the
    classes, so every label would mean another class than the head learnt: refused, naming the class names."""
    from data.synthetic import FOLDER_CLASSES, make_folder_root

    root = make_folder_root(str(tmp_path / "root"), n_train=2, n_test=1)
    out = tmp_path / "run"
    argv = ["--benchmark", "folder", "--data_dir", root, "--dataset", "mine", *TINY, "--epochs", "2",
            "--warmup_epochs", "0", "--batch_size", "4", "--output_dir", out]
    with kill_after(0, 1), pytest.raises(Killed):
        run_train(argv)
    with open(os.path.join(root, "classes.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"{c}\n" for c in sorted(FOLDER_CLASSES, reverse=True))
    before = _md5s(out)
    caplog.clear()
    assert run_train([*argv, "--resume", out / "last.pth"]) == 2
    err = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
    assert len(err) == 1 and "model.class_names: checkpoint" in err[0] and "classes.txt" in err[0], caplog.text
    assert _md5s(out) == before
