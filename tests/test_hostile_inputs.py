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
    from utils.args import parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: dtd\nskip_bad_images: {text}\ntensorboard: {text}\namp: {text}\n")
    args = parse_args(["--config", str(cfg)])
    assert args.skip_bad_images is expected and args.tensorboard is expected and args.amp is expected


@pytest.mark.parametrize("text", ['"maybe"', "2", "", "[true]", '"n"', "0.0", '"truee"'])
def test_config_bad_boolean_refused_naming_the_key(tmp_path, text):
    from utils.args import UsageError, parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: dtd\ntensorboard: {text}\n")
    with pytest.raises(UsageError, match=r"--config .*c\.yaml: 'tensorboard' is a boolean flag"):
        parse_args(["--config", str(cfg)])


def test_config_boolean_and_command_line_flag(tmp_path):
    """A config's false is a default the command line can still turn on (and the reverse)."""
    from utils.args import parse_args

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
