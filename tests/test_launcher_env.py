"""The launchers' environment: a default interpreter without torch (a fresh clone without .venv) and a
missing PYTHON stop with one line saying how to set up; a launcher copied out of train_scripts/ finds the
repository through DTL_ROOT, and without it says so in one line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_train import REPO

LAUNCHERS = ["train_scripts/custom/train_dtl.sh", "train_scripts/vit/vtab/eurosat/train_dtl.sh"]


def _recording_python(tmp_path: Path) -> Path:
    """A stand-in interpreter that writes its arguments (NUL-separated) to $ARGS_OUT."""
    fake = tmp_path / "fake_python"
    fake.write_text('#!/usr/bin/env bash\nprintf \'%s\\0\' "$@" > "$ARGS_OUT"\n')
    fake.chmod(0o755)
    return fake


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATA_DIR", "LOAD_PATH", "NPROC", "TORCHRUN_ARGS", "PYTHON", "DTL_ROOT", "DATASET")}
    env.update(extra)
    return env


def _run(script: Path, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), "--epochs", "1"], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("rel", LAUNCHERS)
def test_a_default_python_without_torch_says_how_to_set_up(tmp_path, rel):
    repo = tmp_path / "fresh clone"  # the launcher and launch_common.sh, no .venv
    (repo / rel).parent.mkdir(parents=True)
    shutil.copy(REPO / rel, repo / rel)
    shutil.copy(REPO / "train_scripts" / "launch_common.sh", repo / "train_scripts" / "launch_common.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"  # a real interpreter without site-packages: no torch
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python3.chmod(0o755)
    env = _env(PATH=f"{bin_dir}:/usr/bin:/bin")
    env.pop("PYTHONPATH", None)
    line = _one_error_line(_run(repo / rel, env, tmp_path))
    assert "python3 cannot import torch" in line and "bash scripts/setup_env.sh" in line and "PYTHON=" in line


def test_a_missing_python_is_named(tmp_path):
    line = _one_error_line(_run(REPO / LAUNCHERS[0], _env(PYTHON=str(tmp_path / "nope")), tmp_path))
    assert f"PYTHON={tmp_path / 'nope'}: no such interpreter" in line


@pytest.mark.parametrize("rel", LAUNCHERS)
def test_a_copied_launcher_needs_dtl_root(tmp_path, rel):
    copy = tmp_path / "my launchers" / "run.sh"
    copy.parent.mkdir()
    shutil.copy(REPO / rel, copy)
    fake = _recording_python(tmp_path)
    out = tmp_path / "argv.bin"
    line = _one_error_line(_run(copy, _env(PYTHON=str(fake), ARGS_OUT=str(out)), tmp_path))
    assert "set DTL_ROOT" in line and not out.exists()
    proc = _run(copy, _env(PYTHON=str(fake), ARGS_OUT=str(out), DTL_ROOT=str(REPO)), tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv = out.read_bytes().decode().split("\0")[:-1]
    assert argv[0] == str(REPO / "train.py") and argv[-2:] == ["--epochs", "1"]
    line = _one_error_line(_run(copy, _env(PYTHON=str(fake), ARGS_OUT=str(out), DTL_ROOT=str(tmp_path)), tmp_path))
    assert f"no DTL repository at {tmp_path}" in line
