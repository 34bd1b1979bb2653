"""Interrupted and foreign runs (issue 20, items 1, 14, 15, 17): a last.pth resumes only into its own folder,
Ctrl-C and SIGTERM end with one line and a released lock, temporaries of a killed write are cleaned up, and every
failed write exits 1. Each case runs train.py (in a subprocess or through ``main``) on a tiny ViT."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import REPO, TINY, Killed, kill_after, read_results, run_train, vtab_root
from models.backbones import create_backbone


@pytest.fixture(scope="module")
def vtab(tmp_path_factory):
    return vtab_root(tmp_path_factory)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "backbone.pth"
    torch.save(create_backbone("vit_tiny_patch16_224", img_size=32).state_dict(), path)
    return str(path)


def _argv(root, out, load_path, *extra, epochs=1):
    return ["--data_dir", root, "--dataset", "cifar_100", *TINY, "--epochs", str(epochs), "--warmup_epochs", "1",
            "--batch_size", "8", "--lr", "1e-2", "--fusion_size", "3", "--load_path", load_path,
            "--output_dir", out, *extra]


def _md5s(folder):
    """The md5 of every file under ``folder``, by relative path."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.md5(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished(vtab, backbone, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_train(_argv(vtab, out, backbone)) == 0
    return out


def _stopped(vtab, backbone, out, epochs=2):
    """A run in ``out`` stopped after its first epoch (last.pth written); returns its argv."""
    argv = _argv(vtab, out, backbone, epochs=epochs)
    with kill_after(0, 1), pytest.raises(Killed):
        run_train(argv)
    return argv


# ------------------------------------------------------------------------- 1. a last.pth resumes into its folder
def test_resume_into_another_run_folder_is_refused(vtab, backbone, finished, tmp_path, caplog, monkeypatch):
    import train

    a = tmp_path / "a"
    argv = _stopped(vtab, backbone, a)
    before, before_a = _md5s(finished), _md5s(a)
    monkeypatch.setattr(train, "build_data", lambda *x, **k: pytest.fail("built the data before the check"))
    for other in (finished, tmp_path / "new"):
        caplog.clear()
        assert run_train(argv[:-2] + ["--output_dir", other, "--resume", a / "last.pth"]) == 2
        errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
        assert len(errors) == 1 and str(a) in errors[0] and str(other) in errors[0], errors
        assert "drop --output_dir" in errors[0]
    assert _md5s(finished) == before and _md5s(a) == before_a
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ 15. temporaries of a killed write, 1. same folder
def test_resume_removes_stale_temporaries_and_keeps_other_files(vtab, backbone, tmp_path, caplog):
    out = tmp_path / "run"
    argv = _stopped(vtab, backbone, out)
    (out / "partial").mkdir(exist_ok=True)
    planted = [out / ".last.pth.a1B2c3_d.tmp", out / "partial" / ".delta_seed0.pth.zz99yy88.tmp"]
    kept = [out / ".last.pth.tmp", out / "notes.tmp", out / "last.pth.a1B2c3_d.tmp"]
    for p in planted + kept:
        p.write_bytes(b"half a checkpoint")
    caplog.clear()
    assert run_train(argv + ["--resume", out / "last.pth"]) == 0  # --output_dir is the last.pth's own folder
    assert not any(p.exists() for p in planted)
    assert all(p.read_bytes() == b"half a checkpoint" for p in kept)
    log = (out / "log.txt").read_text()
    assert "removed 2 temporary file(s) left by a killed run" in log
    assert ".last.pth.a1B2c3_d.tmp" in log and os.path.join("partial", ".delta_seed0.pth.zz99yy88.tmp") in log
    assert read_results(out)["epochs"] == 3  # 2 + 1 warm-up


# ---------------------------------------------------------------------------------- 14. SIGINT and SIGTERM
_SLOW_MAIN = ("import sys, time; sys.path.insert(0, {repo!r}); import train\n"
              "from engine.trainer import Trainer\n"
              "orig = Trainer.train_one_epoch\n"
              "def slow(self, loader, epoch):\n"
              "    stats = orig(self, loader, epoch)\n"
              "    time.sleep(0.5)\n"
              "    return stats\n"
              "Trainer.train_one_epoch = slow\n"
              "sys.exit(train.main(sys.argv[1:]))\n")


def _wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_ends_with_one_line_and_a_resumable_folder(vtab, backbone, tmp_path, sig, status):
    out = tmp_path / "run"
    argv = [str(a) for a in _argv(vtab, out, backbone, epochs=20)]
    log = out / "log.txt"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_MAIN.format(repo=str(REPO)), *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        _wait_for(lambda: proc.poll() is not None or (out / "last.pth").exists() and "epoch 1/21" in log.read_text(),
                  240, "epoch 1 in log.txt and its last.pth")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, stdout + stderr
    line = f"resume with --resume {out / 'last.pth'}"
    assert "Traceback" not in stdout + stderr
    lines = [x for x in (stdout + stderr).splitlines() if "interrupted" in x]
    assert len(lines) == 1 and "interrupted at epoch " in lines[0] and line in lines[0], stdout + stderr
    assert sum("interrupted at epoch" in x and line in x for x in log.read_text().splitlines()) == 1
    assert not (out / ".lock").exists()
    assert run_train(argv + ["--resume", str(out / "last.pth")]) == 0
    assert read_results(out)["epochs"] == 21  # 20 + 1 warm-up


def test_interrupt_before_the_first_checkpoint_says_nothing_can_be_resumed(vtab, backbone, tmp_path, caplog,
                                                                          monkeypatch):
    from engine.trainer import Trainer

    def interrupted(self, loader, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_one_epoch", interrupted)
    out = tmp_path / "run"
    caplog.clear()
    assert run_train(_argv(vtab, out, backbone)) == 130
    assert "stopped before its first checkpoint" in caplog.text and "nothing can be resumed" in caplog.text
    assert "stopped before its first checkpoint" in (out / "log.txt").read_text()
    assert not (out / ".lock").exists() and not (out / "last.pth").exists()


# ------------------------------------------------------------------------------ 17. a failed write is exit 1
def _blocked_log(out: Path) -> str:
    out.mkdir()
    (out / "log.txt").mkdir()
    return f"could not write {out / 'log.txt'}: Is a directory"


def _blocked_lock(out: Path) -> str:
    out.mkdir()
    (out / ".lock").mkdir()
    return f"could not write {out / '.lock'}: Is a directory"


def _parent_is_a_file(out: Path) -> str:
    out.parent.joinpath("file").write_text("x")
    return f"could not write {out.parent / 'file' / 'sub'}: Not a directory"


@pytest.mark.parametrize("block", [_blocked_log, _blocked_lock, _parent_is_a_file])
def test_failed_writes_exit_1_naming_the_file(vtab, backbone, finished, tmp_path, block, capsys):
    out = tmp_path / "run"
    message = block(out)
    if block is _parent_is_a_file:
        out = tmp_path / "file" / "sub"
    before = _md5s(finished)
    assert run_train(_argv(vtab, out, backbone)) == 1
    printed = capsys.readouterr().out
    assert f"error: {message}" in printed and "Traceback" not in printed
    assert _md5s(finished) == before


def test_read_only_output_root_exits_1(vtab, backbone, tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(0o500)
    try:
        if os.access(root, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        assert run_train(_argv(vtab, root / "run", backbone)) == 1
        assert f"error: could not write {root / 'run'}: Permission denied" in capsys.readouterr().out
    finally:
        root.chmod(0o700)


# ------------------------------------------------------- a process-group signal with DataLoader workers
def _group_signal_run(vtab, backbone, out, sig, delay):
    """train.py with two DataLoader workers (forked anew every epoch) in a session of its own; ``sig`` goes to the
    whole process group (as a terminal's Ctrl-C, a killpg or SLURM send it) ``delay`` s after the first last.pth.
    Returns (exit status, stdout + stderr)."""
    argv = [str(a) for a in _argv(vtab, out, backbone, epochs=60)]
    argv[argv.index("--num_workers") + 1] = "2"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        _wait_for(lambda: proc.poll() is not None or (out / "last.pth").exists(), 240, "the first last.pth")
        time.sleep(delay)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, sig)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, output


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_group_signal_with_dataloader_workers(vtab, backbone, tmp_path, sig, status):
    from engine.run_folder import ResumeState
    from utils.checkpoint import read_resume_checkpoint

    for i, delay in enumerate((0.0, 0.3)):  # an epoch here is a fraction of a second: workers start, run, end
        out = tmp_path / f"run{i}"
        rc, output = _group_signal_run(vtab, backbone, out, sig, delay)
        assert rc == status, output
        lines = [x for x in output.splitlines() if "interrupted" in x]
        assert len(lines) == 1 and f"resume with --resume {out / 'last.pth'}" in lines[0], output
        for bad in ("Traceback", "Exception ignored", "internal error", "exited unexpectedly", "killed by signal"):
            assert bad not in output, output
        assert not (out / ".lock").exists()
        state = ResumeState.from_checkpoint(read_resume_checkpoint(str(out / "last.pth")))
        assert state.epoch >= 1 and state.trainer is not None


def test_interrupt_line_names_the_seed_of_a_multi_seed_run(tmp_path_factory, tmp_path, caplog, monkeypatch):
    from engine.run_folder import RunFolder
    from helpers_train import fgfs_root

    orig = RunFolder.save_resume

    def interrupted_in_seed_1(self, state):
        orig(self, state)
        if state.seed_index == 1 and state.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "save_resume", interrupted_in_seed_1)
    out = tmp_path / "run"
    argv = ["--data_dir", fgfs_root(tmp_path_factory), "--dataset", "food101-FS", "--shot", "2", *TINY,
            "--epochs", "2", "--warmup_epochs", "0", "--batch_size", "4", "--seeds", "0,1,2", "--output_dir", out]
    caplog.clear()
    assert run_train(argv) == 130
    line = f"interrupted at epoch 2 of seed 1 (2/3); resume with --resume {out / 'last.pth'}"
    assert line in caplog.text and line in (out / "log.txt").read_text()
