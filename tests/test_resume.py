"""--resume: a run killed after an epoch (or inside seed 1 of a three-seed run) and resumed ends exactly like an
uninterrupted run: same summary.csv rows (timing columns aside), same accuracy, same delta tensors."""
from __future__ import annotations

import os

import pytest
import torch

from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import (
    TINY, Killed, fgfs_root, kill_after, load_delta, read_results, read_summary, result_files, run_train,
    strip_timing, vtab_root,
)


@pytest.fixture(scope="session")
def vtab(tmp_path_factory):
    return vtab_root(tmp_path_factory)


@pytest.fixture(scope="session")
def fgfs(tmp_path_factory):
    return fgfs_root(tmp_path_factory)


def _vtab_argv(root, out):
    # drop_path > 0 and a large lr make the result depend on the RNG stream and on every optimiser state
    return ["--data_dir", root, "--dataset", "cifar_100", *TINY, "--epochs", "2", "--warmup_epochs", "1",
            "--batch_size", "8", "--lr", "1e-2", "--drop_path", "0.2", "--output_dir", out]


def _same_deltas(a, b):
    da, db = load_delta(a)["delta"], load_delta(b)["delta"]
    assert sorted(da) == sorted(db)
    for k in da:
        assert torch.equal(da[k], db[k]), k


@pytest.fixture(scope="module")
def vtab_ref(vtab, tmp_path_factory):
    """An uninterrupted run to compare with."""
    ref = tmp_path_factory.mktemp("resume_ref") / "ref"
    assert run_train(_vtab_argv(vtab, ref)) == 0
    return ref


def test_vtab_killed_after_first_epoch_resumes_identically(vtab, vtab_ref, tmp_path, caplog):
    ref, cut = vtab_ref, tmp_path / "cut"
    with kill_after(0, 1), pytest.raises(Killed):
        run_train(_vtab_argv(vtab, cut))
    assert os.path.isfile(cut / "last.pth")
    assert result_files(cut) == []  # an interrupted run leaves nothing that looks like a result
    assert len(read_summary(cut)) == 1

    # resuming with other settings is refused and changes nothing
    for extra, message in ((["--fusion_size", "3"], "--fusion_size: checkpoint 0 vs now 3"),
                           (["--lr", "0.5"], "--lr: checkpoint 0.01 vs now 0.5")):
        caplog.clear()
        assert run_train(_vtab_argv(vtab, cut) + ["--resume", cut / "last.pth", *extra]) == 2
        assert message in caplog.text
        assert result_files(cut) == [] and len(read_summary(cut)) == 1

    assert run_train(_vtab_argv(vtab, cut) + ["--resume", cut / "last.pth"]) == 0
    assert strip_timing(read_summary(cut)) == strip_timing(read_summary(ref))
    assert read_results(cut)["top1"] == read_results(ref)["top1"]
    assert read_results(cut)["epochs"] == 3
    _same_deltas(ref / "delta.pth", cut / "delta.pth")
    log = open(cut / "log.txt").read()
    assert "resuming from" in log and log.count("run folder:") == 2  # appended, not replaced


def test_resume_default_output_is_the_checkpoints_folder(vtab, vtab_ref, tmp_path):
    cut = tmp_path / "cut"
    with kill_after(0, 2), pytest.raises(Killed):
        run_train(_vtab_argv(vtab, cut))
    argv = _vtab_argv(vtab, cut)
    argv = argv[: argv.index("--output_dir")] + ["--resume", cut / "last.pth"]
    assert run_train(argv) == 0
    assert strip_timing(read_summary(cut)) == strip_timing(read_summary(vtab_ref))
    assert os.path.isfile(cut / "results.json")


def test_resume_rejects_a_delta_file(vtab, vtab_ref, tmp_path, caplog):
    caplog.clear()
    assert run_train(_vtab_argv(vtab, tmp_path / "x") + ["--resume", vtab_ref / "delta.pth"]) == 2
    assert "not a resume checkpoint" in caplog.text and "--eval_only" in caplog.text
    assert not os.path.exists(tmp_path / "x")


def _fs_argv(root, out):
    return ["--data_dir", root, "--dataset", "food101-FS", "--shot", "2", *TINY, "--epochs", "2",
            "--warmup_epochs", "1", "--batch_size", "4", "--lr", "1e-2", "--eval_interval", "2", "--output_dir", out]


def test_three_seed_run_killed_in_seed_1_resumes_in_seed_1(fgfs, tmp_path, monkeypatch):
    import train

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run_train(_fs_argv(fgfs, ref)) == 0
    with kill_after(1, 2), pytest.raises(Killed):
        run_train(_fs_argv(fgfs, cut))
    assert result_files(cut) == []
    assert os.path.isfile(cut / "partial" / "delta_seed0.pth")  # staged, not yet a result

    built = []
    orig = train.build_model
    monkeypatch.setattr(train, "build_model", lambda *a, **k: built.append(1) or orig(*a, **k))
    assert run_train(_fs_argv(fgfs, cut) + ["--resume", cut / "last.pth"]) == 0
    assert len(built) == 2  # seeds 1 and 2 only: seed 0's result was kept, not retrained

    assert strip_timing(read_summary(cut)) == strip_timing(read_summary(ref))
    r_ref, r_cut = read_results(ref), read_results(cut)
    assert r_cut["per_seed"] == r_ref["per_seed"]
    assert r_cut["top1"] == r_ref["top1"]
    for s in (0, 1, 2):
        _same_deltas(ref / f"delta_seed{s}.pth", cut / f"delta_seed{s}.pth")
    assert not os.path.exists(cut / "partial")
