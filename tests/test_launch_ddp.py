"""The launchers themselves (run by bash) with ``NPROC=2`` on the CPU (gloo): one representative launcher per
benchmark (VTAB on ViT, VTAB on Swin, few-shot with the multi-node ``TORCHRUN_ARGS``, domain generalisation)
finishes with ``world_size: 2`` in ``results.json``, and with a training set that divides into the global batch
the two-process VTAB run trains the same delta as the one-process run of the same launcher.

Why the comparison can be exact: see tests/test_ddp.py (the same global batches in the same order, the same
initialisation on every rank, drop_path 0, a deterministic VTAB transform, gradient averaging = the
one-process batch mean). The data here: 16 + 8 training images (train800val200) in global batches of 8, so no
rank pads or drops an image; 9 test images (odd: evaluation must count each exactly once). Tiny models and one
or two epochs keep each run to a few seconds; most of the time is Python start-up (three processes per run).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_train import REPO, TINY, load_delta, read_results, read_summary

ATOL = 2e-5
TASK = "eurosat"
SWIN = ["--model", "swin_tiny_patch4_window7_224", "--img_size", "32", "--num_workers", "0",
        "--batch_size_test", "16", "--model_kwargs",
        "embed_dim=16,depths=[1,1,2,1],num_heads=[1,1,2,2],patch_size=2,window_size=2",
        "--lora_before_blocks", "0-4", "--add_after_blocks", "1-4"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    from data.synthetic import make_dg_root, make_fgfs_root, make_vtab_root

    base = tmp_path_factory.mktemp("launch_ddp")
    return dict(
        vtab=make_vtab_root(str(base / "vtab"), tasks=(TASK,), n_train=16, n_val=8, n_test=9, img_size=32),
        fs=make_fgfs_root(str(base / "fs"), datasets=("food101",), shots=(2,), seeds=(0,), classes_per_dataset=4,
                          img_size=32),
        dg=make_dg_root(str(base / "dg"), targets=("imagenet-sketch",), classes=4, shot=2, seeds=(0,),
                        n_target_per_class=2, img_size=32),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """``bash <launcher>`` started as a user would (random init, tiny-model flags appended); :meth:`wait` returns
    its run folder. All the module's runs start together and run side by side: most of their time is Python
    start-up (three processes per two-process run), which overlaps well even on two cores."""

    def __init__(self, rel: str, data_dir: str, out: Path, args, nproc: int = 2, torchrun_args: str = ""):
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                            "TORCHRUN_ARGS", "NPROC")}
        env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", DATA_DIR=data_dir, LOAD_PATH="", NPROC=str(nproc))
        if nproc > 1 and not torchrun_args:
            torchrun_args = f"--master_addr 127.0.0.1 --master_port {_free_port()}"
        if torchrun_args:
            env["TORCHRUN_ARGS"] = torchrun_args
        self.out = out
        self.log = open(out.parent / f"{out.name}.console", "w+")
        self.proc = subprocess.Popen(["bash", str(REPO / rel), *map(str, args), "--output_dir", str(out)], env=env,
                                     cwd=str(out.parent), stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def wait(self) -> Path:
        try:
            rc = self.proc.wait(timeout=300)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.log.seek(0)
        assert rc == 0, self.log.read()[-4000:]
        return self.out


VTAB_ARGS = [*TINY, "--epochs", "2", "--warmup_epochs", "0", "--batch_size", "8", "--lr", "1e-2", "--drop_path", "0"]
VTAB_VIT = f"train_scripts/vit/vtab/{TASK}/train_dtl+.sh"


@pytest.fixture(scope="module")
def runs(roots, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    fs_args = f"--nnodes 1 --node_rank 0 --master_addr 127.0.0.1 --master_port {_free_port()}"
    started = dict(
        two=Launch(VTAB_VIT, roots["vtab"], base / "two", VTAB_ARGS, nproc=2),
        one=Launch(VTAB_VIT, roots["vtab"], base / "one", VTAB_ARGS, nproc=1),
        swin=Launch(f"train_scripts/swin/vtab/{TASK}/train_dtl.sh", roots["vtab"], base / "swin",
                    [*SWIN, "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "8"]),
        fs=Launch("train_scripts/vit/few_shot/food101-FS/train_dtl+_shot_2.sh", roots["fs"], base / "fs",
                  [*TINY, "--epochs", "2", "--warmup_epochs", "0", "--batch_size", "4", "--seeds", "0"],
                  torchrun_args=fs_args),
        dg=Launch("train_scripts/vit/domain_generalization/imagenet-sketch/train_dtl.sh", roots["dg"], base / "dg",
                  [*TINY, "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "4", "--shot", "2",
                   "--seeds", "0"]),
        killed=Launch(VTAB_VIT, roots["vtab"], base / "killed", [*VTAB_ARGS, "--epochs", "500"], nproc=2),
    )
    yield dict({k: (lambda run=run: run.wait()) for k, run in started.items() if k != "killed"},
               _killed=started["killed"])
    for run in started.values():  # runs no selected test waited for
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        run.log.close()


def _children(pid: int):
    out = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if p.isdigit() and int(fields[1]) == pid:
            out.append(int(p))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_of_the_launcher_ends_the_workers(runs):
    """kill -9 of a two-process launcher (its PID is torchrun's agent, which cannot forward SIGKILL) ends its
    workers too: each asked Linux to signal it when its parent dies (utils.distributed.exit_with_parent)."""
    import signal
    import time

    run = runs["_killed"]
    deadline = time.time() + 240
    while not (run.out / "log.txt").is_file() and time.time() < deadline and run.proc.poll() is None:
        time.sleep(0.1)  # rank 0 logs only after both ranks joined the process group (both set the request)
    assert run.proc.poll() is None, "the long run ended early"
    workers = _children(run.proc.pid)
    assert len(workers) == 2
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait()
    deadline = time.time() + 30
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "orphaned workers keep training"


def test_vit_vtab_two_processes_equal_one_process(runs):
    two, one = runs["two"](), runs["one"]()
    r1, r2 = read_results(one), read_results(two)
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r1["method"] == r2["method"] == "dtl+" and r2["n_test_images"] == {"test": 9}
    assert r2["top1"] == pytest.approx(r1["top1"])
    d1, d2 = load_delta(one / "delta.pth")["delta"], load_delta(two / "delta.pth")["delta"]
    assert sorted(d1) == sorted(d2)
    for k in d1:
        assert torch.allclose(d1[k], d2[k], atol=ATOL, rtol=0), (k, (d1[k] - d2[k]).abs().max())
    assert max(d.abs().max().item() for k, d in d1.items() if "lora_B" in k) > 1e-3  # the side network trained
    for a, b in zip(read_summary(one), read_summary(two)):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-5)


def test_swin_vtab_two_processes(runs):
    res = read_results(runs["swin"]())
    assert res["world_size"] == 2 and res["backbone"].startswith("swin_tiny_patch4_window7_224[")
    assert res["n_test_images"] == {"test": 9}


def test_few_shot_with_multi_node_torchrun_args(runs):
    res = read_results(runs["fs"]())
    assert res["world_size"] == 2 and res["benchmark"] == "few_shot" and res["shot"] == 2
    assert res["n_test_images"]["test"] == 8  # 4 classes x 2 test images, each counted once


def test_domain_generalization_two_processes(runs):
    res = read_results(runs["dg"]())
    assert res["world_size"] == 2 and res["benchmark"] == "domain_generalization"
    assert res["n_test_images"] == {"imagenet-sketch": 8}



def _launch_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "TORCHRUN_ARGS", "NPROC")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", LOAD_PATH="", NPROC="2",
               TORCHRUN_ARGS=f"--master_addr 127.0.0.1 --master_port {_free_port()}", **extra)
    return env


def test_two_process_user_error_is_exit_2_without_torchruns_report(roots, tmp_path):
    """tools/torchrun.py: a user error in both processes is exit status 2, their error lines and one short line,
    not torchrun's ChildFailedError report and exit 1."""
    proc = subprocess.run(["bash", str(REPO / VTAB_VIT), *VTAB_ARGS, "--cache_dir", str(tmp_path / "nonexistent"),
                           "--output_dir", str(tmp_path / "out")], env=_launch_env(DATA_DIR=roots["vtab"]),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "error: --cache_dir" in output and "torchrun: process(es) of rank 0, 1 failed (exit status 2)" in output
    assert "ChildFailedError" not in output and "Traceback" not in output, output


def test_two_process_group_sigint_is_130_with_one_line(roots, tmp_path):
    """Ctrl-C (SIGINT to the whole process group: the agent and both ranks) of a two-process launcher: rank 0's
    one line, exit status 130, no SignalException traceback from torchrun's agent, the lock released."""
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(REPO / VTAB_VIT), *VTAB_ARGS, "--epochs", "500", "--output_dir", str(out)],
                            env=_launch_env(DATA_DIR=roots["vtab"]), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and not (out / "last.pth").exists():
            assert time.monotonic() < deadline, "no last.pth"
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, output
    lines = [x for x in output.splitlines() if "interrupted" in x]
    assert len(lines) == 1 and f"resume with --resume {out / 'last.pth'}" in lines[0], output
    assert "Traceback" not in output and "SignalException" not in output, output
    assert not (out / ".lock").exists()
