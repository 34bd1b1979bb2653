"""Hostile or unusual input that used to be accepted silently or reported badly (issue 14): YAML booleans given as
strings in ``--config``, 16-bit and 32-bit images, out-of-range values in ``tools/aggregate.py``, and the
launcher / ``run_demo.sh`` messages (empty DATA_DIR, a folder as LOAD_PATH, unknown dataset, ``--help``)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from conftest import REPO


# ------------------------------------------------------------------------------------ --config booleans
@pytest.mark.parametrize("text, expected", [
    ("true", True), ("false", False), ("yes", True), ("no", False), ("on", True), ("off", False),  # YAML booleans
    ('"no"', False), ('"false"', False), ("'Off'", False), ('"0"', False), ("0", False),
    ('"yes"', True), ('"TRUE"', True), ("1", True), ('" on "', True),
])
def test_config_booleans_parsed_strictly(tmp_path, text, expected):
    from cli.flags import parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: dtd\nskip_bad_images: {text}\ntensorboard: {text}\namp: {text}\n")
    args = parse_args(["--config", str(cfg)])
    assert args.skip_bad_images is expected and args.tensorboard is expected and args.amp is expected


@pytest.mark.parametrize("text", ['"maybe"', "2", "", "[true]", '"n"', "0.0", '"truee"'])
def test_config_bad_boolean_refused_naming_the_key(tmp_path, text):
    from cli.flags import UsageError, parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: dtd\ntensorboard: {text}\n")
    with pytest.raises(UsageError, match=r"--config .*c\.yaml: 'tensorboard' is a boolean flag"):
        parse_args(["--config", str(cfg)])


def test_config_boolean_and_command_line_flag(tmp_path):
    """A config's false is a default the command line can still turn on (and the reverse)."""
    from cli.flags import parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text('dataset: dtd\ntensorboard: "no"\nprefetcher: "yes"\n')
    args = parse_args(["--config", str(cfg), "--tensorboard", "--no-prefetcher"])
    assert args.tensorboard is True and args.prefetcher is False


# ------------------------------------------------------------------------------------ 16-bit images
def _gradient16() -> np.ndarray:
    """A 16 x 16 ramp over the whole 16-bit range, plus the exact 16-bit versions of a few 8-bit values."""
    a = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    a[0, :4] = np.array([0, 127, 128, 255], dtype=np.uint16) * 257
    return a


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    from data.listfile import load_rgb

    a = _gradient16()
    path = tmp_path / "grey16.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(load_rgb(str(path)))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    expected = np.round(a / 257.0).astype(np.uint8)
    assert (rgb == expected[..., None]).all()
    assert list(rgb[0, :4, 0]) == [0, 127, 128, 255]  # 16-bit versions of 8-bit values come back exactly
    assert abs(rgb.mean() - a.mean() / 257) < 0.5  # not clipped to white (PIL's convert gives ~254)
    assert np.asarray(Image.open(path).convert("RGB")).mean() > 250  # what the scaling prevents


def test_16_bit_images_through_the_dataset_and_the_data_check(tmp_path):
    """A VTAB root with one 16-bit PNG: the dataset loads it scaled, tools/check_data.py names it in a warning
    (the check still passes); a 32-bit float TIFF is refused by both, naming the file."""
    from data.check import check_data_root
    from data.datasets import DataError, ListFileDataset
    from data.synthetic import make_vtab_root

    root = make_vtab_root(str(tmp_path / "vtab"), tasks=("dtd",), n_train=4, n_val=2, n_test=3, img_size=16)
    task = os.path.join(root, "dtd")
    first = open(os.path.join(task, "test.txt")).readline().split()[0]
    grey = np.asarray(Image.open(os.path.join(task, first)).convert("L")).astype(np.uint16) * 257
    Image.fromarray(grey).save(os.path.join(task, first))  # same picture, 16 bits
    ds = ListFileDataset(task, os.path.join(task, "test.txt"), 47)
    img, _ = ds[0]
    assert np.array_equal(np.asarray(img)[..., 0], (grey // 257).astype(np.uint8))

    rep = check_data_root(root, check_images=True)
    assert rep.ok, rep.format()
    assert any(first in w and "16-bit image (PIL mode I;16): scaled to 8 bits" in w for w in rep.all_warnings)
    assert "test.txt:1" in "\n".join(rep.all_warnings)

    Image.fromarray(grey.astype(np.float32) / 65535.0, mode="F").save(os.path.join(task, "f32.tiff"))
    with open(os.path.join(task, "test.txt"), "a") as f:
        f.write("f32.tiff 0\n")
    ds = ListFileDataset(task, os.path.join(task, "test.txt"), 47)
    with pytest.raises(DataError, match=r"f32\.tiff: unsupported image: 32-bit float image \(PIL mode F\).*test\.txt:4"):
        ds[len(ds) - 1]
    rep = check_data_root(root, check_images=True)
    assert not rep.ok and any("f32.tiff: unsupported image: 32-bit float" in e for e in rep.all_errors)


# ------------------------------------------------------------------------------------ tools/aggregate.py
def _results(root, rel, top1, per_seed=None):
    import json

    d = os.path.join(str(root), rel)
    os.makedirs(d, exist_ok=True)
    res = dict(benchmark="vtab", dataset="dtd", backbone="vit_tiny", method="dtl", top1=top1)
    if per_seed is not None:
        res["per_seed"] = [{"seed": s, "top1": v} for s, v in per_seed]
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(res, f)
    return os.path.join(d, "results.json")


@pytest.mark.parametrize("top1, per_seed, needle", [
    (250.0, None, "top1 = 250.0 is not a top-1 accuracy in percent (outside [0, 100])"),
    (-0.5, None, "top1 = -0.5 is not a top-1 accuracy"),
    ("71.3", None, "top1 must be a finite number, got '71.3'"),
    (None, [(0, 70.0), (1, 170.0)], "per_seed top1 = 170.0 is not a top-1 accuracy"),
    (60.0, [(0, 60.0), (1, "n/a")], "per_seed top1 must be a finite number, got 'n/a'"),
])
def test_aggregate_refuses_values_outside_0_100(tmp_path, capsys, top1, per_seed, needle):
    from tools.aggregate import collect, main

    good = _results(tmp_path, "good", 40.0, [(5, 40.0)])
    bad = _results(tmp_path, "bad", top1, per_seed)
    rc = main([str(tmp_path), "--fig_dir", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert rc == 2 and bad in err and needle in err and "--skip_bad" in err
    assert not os.path.exists(tmp_path / "aggregate.md")

    rc = main([str(tmp_path), "--skip_bad", "--fig_dir", str(tmp_path / "f")])
    cap = capsys.readouterr()
    assert rc == 0 and f"note: skipped: {bad}" in cap.err and needle in cap.err
    # nothing of the skipped file reaches the table, not even its valid per-seed values
    assert "| 40.0 |" in cap.out and "70.0" not in cap.out and "55.0" not in cap.out
    col = collect(str(tmp_path), skip_bad=True)
    assert [c.files for c in col.cells.values()] == [[good]] and col.n_files == 1


def test_aggregate_accepts_the_bounds(tmp_path, capsys):
    from tools.aggregate import main

    _results(tmp_path, "zero", 0.0, [(0, 0.0)])
    _results(tmp_path, "hundred", 100, [(1, 100)])
    assert main([str(tmp_path), "--fig_dir", str(tmp_path / "f")]) == 0
    assert "50.0 ± 70.7" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ messages of small mistakes
def _train_fails(argv, caplog, *needles):
    from helpers_train import run_train

    caplog.clear()
    assert run_train(argv) == 2
    for n in needles:
        assert n in caplog.text, (n, caplog.text[-2000:])
    return caplog.text


def test_empty_data_dir_is_named(tmp_path, caplog, monkeypatch):
    """An unset DATA_DIR (``--data_dir ''``) says so, for each benchmark (it used to print ``error: : ...``)."""
    from data.datasets import DataError
    from data.domain_generalization import build_dg_source
    from data.few_shot import build_fgfs_dataset
    from helpers_train import TINY

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    text = _train_fails(["--data_dir", "", "--dataset", "dtd", *TINY, "--output_dir", out], caplog,
                        "no VTAB data root given: --data_dir is empty (the launchers' DATA_DIR")
    assert "error: : " not in text and not out.exists()
    with pytest.raises(DataError, match="no few-shot data root given: --data_dir is empty"):
        build_fgfs_dataset("", "food101", "train", shot=1, seed=0)
    with pytest.raises(DataError, match="no domain-generalisation data root given: --data_dir is empty"):
        build_dg_source("", seed=0)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(DataError, match="VTAB data root is a file, not a folder"):
        from data.vtab import build_vtab_dataset
        build_vtab_dataset(str(not_a_dir), "dtd", "test")


def test_folder_given_as_load_path_resume_or_checkpoint(tmp_path, caplog):
    from helpers_train import TINY

    out = tmp_path / "out"
    base = ["--data_dir", str(tmp_path), "--dataset", "dtd", *TINY, "--output_dir", out]
    _train_fails([*base, "--load_path", tmp_path], caplog,
                 f"--load_path {tmp_path}: is a directory, not a file; give the weights file itself")
    _train_fails([*base, "--resume", tmp_path], caplog, f"--resume {tmp_path}: is a directory, not a file")
    _train_fails([*base, "--eval_only", "--checkpoint", tmp_path], caplog,
                 f"--checkpoint {tmp_path}: is a directory, not a file")
    assert not out.exists() and "not found" not in caplog.text


def test_unknown_dataset_lists_the_valid_names(tmp_path, caplog):
    out = tmp_path / "out"
    _train_fails(["--data_dir", str(tmp_path), "--dataset", "cifar_1000", "--output_dir", out], caplog,
                 "neither a VTAB-1k task, a few-shot dataset nor a DG target",
                 "cifar_100, caltech101, dtd", "food101", "imagenet-sketch")
    _train_fails(["--data_dir", str(tmp_path), "--benchmark", "few_shot", "--dataset", "food", "--shot", "1",
                  "--output_dir", out], caplog, "unknown few-shot dataset 'food'; valid: fgvc-aircraft, food101")
    _train_fails(["--data_dir", str(tmp_path), "--benchmark", "domain_generalization", "--dataset", "sketch",
                  "--output_dir", out], caplog, "unknown domain-generalisation target 'sketch'; valid: imagenet")
    assert not out.exists()


def test_run_demo_help_installs_nothing(tmp_path):
    """``bash run_demo.sh --help`` prints the demo's options and never runs the setup script (a stand-in here that
    leaves a mark); without --help the setup runs first."""
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "demo").mkdir()
    shutil.copy(REPO / "run_demo.sh", repo / "run_demo.sh")
    shutil.copy(REPO / "demo" / "run_demo.py", repo / "demo" / "run_demo.py")
    mark = tmp_path / "setup_ran"
    (repo / "scripts" / "setup_env.sh").write_text(f'touch "{mark}"\n')
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(sys.executable, bindir / "python3")
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    for flag in ("--help", "-h"):
        p = subprocess.run(["bash", str(repo / "run_demo.sh"), "--workdir", "x", flag], env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert "usage: bash run_demo.sh" in p.stdout and "--workdir" in p.stdout
        assert not mark.exists()
    p = subprocess.run(["bash", str(repo / "run_demo.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert mark.exists()  # the stand-in setup ran (the demo itself then fails: no .venv in this copy)


def test_demo_refuses_to_delete_a_foreign_workdir(tmp_path):
    from demo.run_demo import main

    work = tmp_path / "mine"
    work.mkdir()
    (work / "thesis.tex").write_text("precious")
    with pytest.raises(SystemExit) as e:
        main(["--workdir", str(work)])
    assert e.value.code == 2 and (work / "thesis.tex").read_text() == "precious"


def test_written_files_have_the_usual_permissions(tmp_path):
    """.npz backbones, aggregate tables and checkpoints are 0666 & ~umask (0644 under umask 022), not mkstemp's
    0600."""
    import timm

    from models.npz import save_vit_npz
    from tools.aggregate import main as aggregate
    from utils.checkpoint import atomic_write_bytes

    old = os.umask(0o022)
    try:
        vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, depth=1)
        save_vit_npz(vit, str(tmp_path / "b.npz"))
        atomic_write_bytes(str(tmp_path / "c.bin"), b"x")
        _results(tmp_path / "runs", "a", 50.0)
        assert aggregate([str(tmp_path / "runs"), "--fig_dir", str(tmp_path / "f")]) == 0
        for name in ("b.npz", "c.bin", "runs/aggregate.md", "runs/aggregate_long.csv"):
            assert (os.stat(tmp_path / name).st_mode & 0o777) == 0o644, name
        os.umask(0o077)
        save_vit_npz(vit, str(tmp_path / "private.npz"))
        assert (os.stat(tmp_path / "private.npz").st_mode & 0o777) == 0o600
    finally:
        os.umask(old)
