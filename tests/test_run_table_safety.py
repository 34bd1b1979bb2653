"""tools/run_table.py with other processes around: a run folder whose lock a live process holds is left alone
(reported "running elsewhere"); a second run_table on a locked output root is refused in one line; a kill -9
of run_table ends its launchers; a finished or interrupted run recorded with other flags is refused up front
(or moved aside with --rerun_changed); a top-1 from a run that skipped images is marked in status.md.

The launchers are the real ones; the Python they start is a stand-in (``PYTHON``) that writes a results.json or
sleeps, so nothing trains."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from helpers_train import REPO
from tools.run_table import main
from tools.runtable.plan import describe

RUN_TABLE = str(REPO / "tools" / "run_table.py")
DTD = str(REPO / "train_scripts/vit/vtab/dtd/train_dtl.sh")
FLAGS = ["--model", "vit_tiny_patch16_224", "--img_size", "32", "--epochs", "2"]
RUN = Path("vit_tiny_patch16_224") / "vtab" / "dtd" / "dtl"

# The stand-in for python: "train.py" writes results.json into --output_dir; FAKE_SLEEP makes it record its pid
# and sleep instead.
FAKE_PYTHON = textwrap.dedent(f"""\
    #!{sys.executable}
    import json, os, sys, time
    out = sys.argv[sys.argv.index("--output_dir") + 1]
    if os.environ.get("FAKE_SLEEP"):
        with open(os.environ["FAKE_SLEEP"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(benchmark="vtab", dataset="dtd", method="dtl", backbone="vit_tiny_patch16_224", top1=50.0), f)
    """)

# A process that holds an flock on PATH (with the holder's details in it, as utils.runlock writes them) until killed.
HOLDER = textwrap.dedent("""\
    import fcntl, json, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps(dict(host="here", pid=os.getpid(), since="now", command=sys.argv[2])).encode())
    print("locked", flush=True)
    time.sleep(120)
    """)


@pytest.fixture
def env(tmp_path, monkeypatch):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LOAD_PATH", "")
    monkeypatch.setenv("PYTHON", str(fake))
    monkeypatch.delenv("FAKE_SLEEP", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return dict(os.environ)


@pytest.fixture
def hold():
    """hold(path, command) -> the pid of a live process holding the lock file ``path``."""
    procs = []

    def start(path: Path, command: str) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), command], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p.pid

    yield start
    for p in procs:
        p.kill()
        p.wait(10)


def _table(root: Path, *extra: str) -> int:
    return main([DTD, "--output_root", str(root), "--gpus", "", *extra, "--", *FLAGS])


def _record(folder: Path, flags, files=("results.json",)) -> None:
    """A run folder as train.py leaves it: config.yaml (the resolved flags) and ``files``."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = describe(DTD, flags, {})["settings"]
    (folder / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in settings.items() if k != "config"}))
    for name in files:
        (folder / name).write_text(json.dumps(dict(benchmark="vtab", dataset="dtd", method="dtl", top1=27.5,
                                                   backbone="vit_tiny_patch16_224")) if name == "results.json"
                                   else "checkpoint")


def test_a_run_folder_in_use_is_left_alone(env, tmp_path, hold, capsys):
    root = tmp_path / "out"
    run = root / RUN
    run.mkdir(parents=True)
    (run / "last.pth").write_text("checkpoint of the live run")
    pid = hold(run / ".lock", "train.py --output_dir elsewhere")
    before = sorted(p.name for p in run.iterdir())
    assert _table(root) == 1  # not finished, not failed
    status = (root / "status.md").read_text()
    row = next(line for line in status.splitlines() if str(RUN) in line)
    assert "| running elsewhere |" in row and f"pid {pid}" in row and "failed" not in status
    assert sorted(p.name for p in run.iterdir()) == before and (run / "last.pth").read_text().startswith("checkpoint")
    assert [p.name for p in run.parent.iterdir()] == ["dtl"]  # nothing moved aside
    assert f"pid {pid}" in capsys.readouterr().err


def test_a_second_run_table_on_a_locked_root_is_refused(env, tmp_path, hold, capsys):
    root = tmp_path / "out"
    pid = hold(root / ".lock", "run_table.py --output_root out")
    assert _table(root) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("run_table: error: ") and f"pid {pid}" in err[0], err
    assert "another run_table" in err[0] and not (root / RUN).exists()


def test_kill_9_of_run_table_ends_its_launcher(env, tmp_path):
    root = tmp_path / "out"
    pid_file = tmp_path / "child.pid"
    cmd = [sys.executable, RUN_TABLE, DTD, "--output_root", str(root), "--gpus", "", "--", *FLAGS]
    table = subprocess.Popen(cmd, cwd=REPO, env=dict(env, FAKE_SLEEP=str(pid_file)), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline and table.poll() is None:
        time.sleep(0.1)
    assert pid_file.exists(), "the launcher did not start"
    child = int(pid_file.read_text())
    assert _alive(child)
    table.send_signal(signal.SIGKILL)
    table.wait(10)
    deadline = time.time() + 20
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    if _alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the launcher outlived run_table")
    # the root's lock died with it: the next run_table takes over and finishes the run
    assert _table(root) == 0 and (root / RUN / "results.json").is_file()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_finished_run_with_other_flags_is_refused_or_moved_aside(env, tmp_path, capsys):
    root = tmp_path / "out"
    _record(root / RUN, FLAGS)
    assert _table(root) == 0  # the same flags: skipped
    assert "finished before" in (root / "status.md").read_text()
    capsys.readouterr()
    new = ["--epochs", "3", "--lr", "0.05"]
    assert main([DTD, "--output_root", str(root), "--gpus", "", "--", *FLAGS, *new]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("run_table: error: "), err
    assert "--epochs: recorded 2, requested 3" in err[0] and "--lr: recorded 0.0003, requested 0.05" in err[0]
    assert "--rerun_changed" in err[0] and not (root / RUN / "run_table.log").exists()
    assert main([DTD, "--output_root", str(root), "--gpus", "", "--rerun_changed", "--", *FLAGS, *new]) == 0
    prev = [p for p in (root / RUN).parent.iterdir() if p.name.startswith("dtl.prev-")]
    assert len(prev) == 1 and json.loads((prev[0] / "results.json").read_text())["top1"] == 27.5
    assert json.loads((root / RUN / "results.json").read_text())["top1"] == 50.0
    assert "--epochs 3 --lr 0.05" in (root / RUN / "run_table.log").read_text()


def test_an_interrupted_run_with_other_flags_is_refused_up_front(env, tmp_path, capsys):
    root = tmp_path / "out"
    _record(root / RUN, FLAGS, files=("last.pth",))
    assert main([DTD, "--output_root", str(root), "--gpus", "", "--", *FLAGS, "--warmup_epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert "interrupted (last.pth) with other settings" in err and "--warmup_epochs: recorded 10, requested 0" in err
    assert not (root / RUN / "run_table.log").exists()


def test_skipped_images_are_marked_in_the_status(env, tmp_path):
    root = tmp_path / "out"
    (root / RUN).mkdir(parents=True)
    (root / RUN / "results.json").write_text(json.dumps(dict(benchmark="vtab", dataset="dtd", method="dtl",
                                                             backbone="vit_tiny_patch16_224", top1=27.5,
                                                             skipped_images=6)))
    assert _table(root) == 0
    status = (root / "status.md").read_text()
    assert "| 27.50‡ |" in status and "‡ images skipped" in status
    assert "| 27.5‡ |" in (root / "table.md").read_text()
