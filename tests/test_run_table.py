"""tools/run_table.py: many launchers on local CPU slots (skip finished, resume interrupted, failures isolated,
status and table) and on SLURM through submitit, with stand-in sbatch/srun/scontrol/sacct on PATH; and
tools/aggregate.py --paper."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_train import REPO

sys.path.insert(0, str(REPO / "tools"))
import aggregate  # noqa: E402
import run_table  # noqa: E402
from tools.runtable.plan import RunSpec, TableError, prepare  # noqa: E402
from tools.runtable.slurm import parse_slurm_time  # noqa: E402

RUN_TABLE = str(REPO / "tools" / "run_table.py")
EUROSAT = "train_scripts/vit/vtab/eurosat/train_dtl.sh"
DTD = "train_scripts/vit/vtab/dtd/train_dtl.sh"
SVHN_PLUS = "train_scripts/vit/vtab/svhn/train_dtl+.sh"
CIFAR = "train_scripts/vit/vtab/cifar_100/train_dtl.sh"
TINY = ["--model", "vit_tiny_patch16_224", "--img_size", "32", "--num_workers", "0", "--batch_size", "8",
        "--batch_size_test", "16", "--epochs", "2", "--warmup_epochs", "1"]


@pytest.fixture(scope="module")
def vtab(tmp_path_factory):
    from data.synthetic import make_vtab_root

    return make_vtab_root(str(tmp_path_factory.mktemp("rt_vtab")), tasks=("eurosat", "dtd", "svhn"), n_train=16,
                          n_val=8, n_test=12, img_size=32, seed=0)


@pytest.fixture
def env(vtab, monkeypatch):
    monkeypatch.setenv("DATA_DIR", vtab)
    monkeypatch.setenv("LOAD_PATH", "")  # random initialisation (tests only)
    monkeypatch.setenv("PYTHON", sys.executable)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("TORCHRUN_ARGS", raising=False)
    return dict(os.environ)


def _folder(root: Path, task: str, method: str) -> Path:
    return root / "vit_tiny_patch16_224" / "vtab" / task / method


def _main(argv):
    return run_table.main([str(a) for a in argv])


def test_three_launchers_two_slots_then_nothing_to_do(env, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [EUROSAT, DTD, SVHN_PLUS, "--output_root", out, "--executor", "local", "--slots", "2", "--gpus", "",
            "--", *TINY]
    assert _main(argv) == 0
    cap = capsys.readouterr()
    runs = [_folder(out, "eurosat", "dtl"), _folder(out, "dtd", "dtl"), _folder(out, "svhn", "dtl+")]
    for r in runs:
        res = json.loads((r / "results.json").read_text())
        assert res["backbone"] == "vit_tiny_patch16_224" and res["epochs"] == 3
    assert json.loads((runs[2] / "results.json").read_text())["method"] == "dtl+"
    # two slots: two runs started together, the third waited
    assert "0/3 done, 2 running, 1 queued, 0 failed" in cap.err
    status = (out / "status.md").read_text()
    assert status.count("| done |") == 3 and "3 run(s): 3 done" in status
    table = (out / "table.md").read_text()
    assert "VTAB-1k (top-1 %)" in table and "| vit_tiny_patch16_224 | dtl+ |" in table
    assert (out / "table_vtab.csv").is_file() and (out / "table_paper.csv").is_file()
    logs = {r: (r / "run_table.log").read_text() for r in runs}
    assert all(text.count("=== run_table") == 1 for text in logs.values())
    # the same command again runs nothing
    assert _main(argv) == 0
    assert "3 run(s): 3 skipped" in (out / "status.md").read_text()
    assert {r: (r / "run_table.log").read_text() for r in runs} == logs


def test_interrupted_table_resumes_from_last_pth(env, tmp_path):
    out = tmp_path / "out"
    long = [*TINY[:-4], "--epochs", "30", "--warmup_epochs", "1"]
    cmd = [sys.executable, RUN_TABLE, EUROSAT, "--output_root", str(out), "--gpus", "", "--", *long]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = _folder(out, "eurosat", "dtl")
    deadline = time.time() + 180
    while not (run / "last.pth").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (run / "last.pth").exists(), proc.communicate()[0]
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the table stops its runs
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, text
    assert "| interrupted |" in (out / "status.md").read_text()
    assert not (run / "results.json").exists()
    epochs_before = len([l for l in (run / "summary.csv").read_text().splitlines()[1:] if l.strip()])
    assert 1 <= epochs_before < 31
    rc = _main([EUROSAT, "--output_root", out, "--gpus", "", "--", *long])
    assert rc == 0
    log = (run / "run_table.log").read_text()
    assert log.count("=== run_table") == 2
    assert f"--resume {run / 'last.pth'}" in log.split("=== run_table")[2]
    res = json.loads((run / "results.json").read_text())
    assert res["epochs"] == 31
    assert "resuming from" in (run / "log.txt").read_text()


def test_a_failed_run_does_not_stop_the_others(env, tmp_path, capsys):
    out = tmp_path / "out"
    # the data root has no cifar_100 task: that run fails in train.py's data check, dtd still runs
    rc = _main([CIFAR, DTD, "--output_root", out, "--gpus", "", "--slots", "1", "--", *TINY])
    assert rc == 1
    assert (_folder(out, "dtd", "dtl") / "results.json").is_file()
    status = (out / "status.md").read_text()
    failed = [l for l in status.splitlines() if "| failed |" in l]
    assert len(failed) == 1 and "cifar_100" in failed[0]
    log = _folder(out, "cifar_100", "dtl") / "run_table.log"
    assert f"log: {log}" in failed[0] and "cifar" in log.read_text()
    assert "| vit_tiny_patch16_224 | dtl |" in (out / "table.md").read_text()
    assert "FAILED vit_tiny_patch16_224/vtab/cifar_100/dtl" in capsys.readouterr().err


def test_bad_input_fails_before_anything_runs(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert _main([DTD, "--output_root", out, "--", *TINY, "--output_dir", "x"]) == 2
    assert "--output_dir after '--'" in capsys.readouterr().err
    assert _main([DTD, "--output_root", out, "--", *TINY, "--lr", "fast"]) == 2
    assert DTD in capsys.readouterr().err
    assert _main([str(tmp_path / "nothing*.sh"), "--output_root", out]) == 2
    assert "no launcher matches" in capsys.readouterr().err
    # a second launcher that would write into the same folder
    alias = tmp_path / "alias.sh"
    alias.write_text(f'#!/usr/bin/env bash\nexec bash {REPO / DTD} "$@"\n')
    assert _main([DTD, alias, "--output_root", out, "--", *TINY]) == 2
    assert "would both run into vit_tiny_patch16_224/vtab/dtd/dtl" in capsys.readouterr().err
    monkeypatch.delenv("DATA_DIR")
    assert _main([DTD, "--output_root", out, "--", *TINY]) == 2
    assert "DATA_DIR is the launcher's placeholder /path/to/VTAB/vtab-1k" in capsys.readouterr().err
    assert not out.exists() or not any(out.rglob("run_table.log"))


def test_unwritable_output_root_is_exit_1_naming_it(env, tmp_path, capsys):
    (tmp_path / "blocker").write_text("x")
    out = tmp_path / "blocker" / "table"
    assert _main([DTD, "--output_root", out, "--", *TINY]) == 1
    assert f"run_table: error: could not write {out}: Not a directory" in capsys.readouterr().err


def test_slurm_time_formats():
    assert parse_slurm_time("90") == 90
    assert parse_slurm_time("2:00:00") == 120
    assert parse_slurm_time("1-12:00:00") == 2160
    assert parse_slurm_time("1-0") == 1440
    assert parse_slurm_time("0:30:01") == 31
    with pytest.raises(TableError, match="--slurm_time"):
        parse_slurm_time("two hours")


def test_stale_folder_is_moved_aside(tmp_path):
    spec = RunSpec(name="a", launcher=str(REPO / DTD), out_dir=str(tmp_path / "a"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.csv").write_text("seed,epoch\n")
    cmd = prepare(spec).command
    assert cmd[-2:] == ["--output_dir", spec.out_dir] and "--resume" not in cmd
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("a.attempt-")]
    assert len(aside) == 1 and (tmp_path / aside[0] / "summary.csv").is_file()
    assert not (tmp_path / "a" / "summary.csv").exists()


# ------------------------------------------------------------------------------------------------ SLURM
def _fake_slurm(tmp_path: Path) -> Path:
    """Stand-ins for sbatch (records the script, answers a job id), srun (not run here), scontrol (records)
    and sacct (answers the states written in FAKE_SLURM_DIR/states)."""
    bin_dir = tmp_path / "fake_slurm_bin"
    bin_dir.mkdir()
    scripts = {
        "sbatch": 'cp "$1" "$FAKE_SLURM_DIR/submitted.sh"\nprintf \'%s\\n\' "$@" > "$FAKE_SLURM_DIR/sbatch_args"\n'
                  'echo "Submitted batch job 4242"\n',
        "srun": 'echo "srun $*" >> "$FAKE_SLURM_DIR/srun_calls"\nexit 1\n',
        "scontrol": 'echo "$*" >> "$FAKE_SLURM_DIR/scontrol_calls"\n',
        "sacct": 'echo "JobID|State|NodeList"\ncat "$FAKE_SLURM_DIR/states" 2>/dev/null\n',
    }
    for name, body in scripts.items():
        p = bin_dir / name
        p.write_text("#!/bin/sh\n" + body)
        p.chmod(0o755)
    return bin_dir


@pytest.fixture
def slurm(env, tmp_path, monkeypatch):
    bin_dir = _fake_slurm(tmp_path)
    rec = tmp_path / "slurm_records"
    rec.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(rec))
    return rec


def test_slurm_no_wait_submits_one_array(slurm, tmp_path, capsys):
    out = tmp_path / "out"
    rc = _main([EUROSAT, DTD, SVHN_PLUS, "--output_root", out, "--executor", "slurm", "--slurm_partition", "P",
                "--slurm_time", "2:00:00", "--slurm_account", "acct", "--gpus_per_job", "2",
                "--slurm_array_parallelism", "2", "--slurm_mem", "32G", "--no_wait", "--", *TINY])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "submitted array 4242 (3 task(s)" in stdout and "4242_0 4242_1 4242_2" in stdout
    assert f"--output_root {out} --collect" in stdout
    script = (slurm / "submitted.sh").read_text()
    for line in ("#SBATCH --partition=P", "#SBATCH --time=120", "#SBATCH --gpus-per-node=2", "#SBATCH --array=0-2%2",
                 "#SBATCH --account=acct", "#SBATCH --mem=32G", "#SBATCH --signal=USR2@90"):
        assert line in script, script
    assert "submitit.core._submit" in script
    man = json.loads((out / "run_table.json").read_text())
    assert sorted(man["slurm_jobs"].values()) == ["4242_0", "4242_1", "4242_2"]
    assert not list(out.rglob("run_table.log"))  # nothing ran here
    # collecting while the array runs: nothing finished, not a success
    (slurm / "states").write_text("4242_0|RUNNING|node1\n4242_1|PENDING|\n4242_2|PENDING|\n")
    assert _main(["--output_root", out, "--collect"]) == 1
    status = (out / "status.md").read_text()
    assert "| running |" in status and status.count("| pending |") == 2


def test_slurm_needs_a_partition_and_known_parameters(slurm, tmp_path, capsys):
    out = tmp_path / "out"
    assert _main([DTD, "--output_root", out, "--executor", "slurm", "--no_wait", "--", *TINY]) == 2
    assert "--slurm_partition" in capsys.readouterr().err
    assert _main([DTD, "--output_root", out, "--executor", "slurm", "--slurm_partition", "P", "--slurm_colour",
                  "red", "--no_wait", "--", *TINY]) == 2
    assert "colour" in capsys.readouterr().err


def _job_env(base, job_id: str):
    """SLURM's variables of a job (``A_i``: task i of array A) as srun sets them."""
    e = dict(base, SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID=job_id.split("_")[0], SLURM_PROCID="0", SLURM_LOCALID="0",
             SLURM_NODEID="0", SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost")
    if "_" in job_id:
        e.update(SLURM_JOB_ID=str(5000 + int(job_id.split("_")[1])), SLURM_ARRAY_JOB_ID=job_id.split("_")[0],
                 SLURM_ARRAY_TASK_ID=job_id.split("_")[1])
    return e


def test_slurm_preempted_job_is_requeued_and_resumes(slurm, tmp_path):
    """The array task runs as srun would run it (submitit's job entry point with SLURM's variables); SIGUSR2
    (SLURM's warning before preemption) stops the launcher and requeues through scontrol; the requeued task
    continues from last.pth."""
    out = tmp_path / "out"
    long = [*TINY[:-4], "--epochs", "30", "--warmup_epochs", "1"]
    rc = _main([EUROSAT, "--output_root", out, "--executor", "slurm", "--slurm_partition", "P", "--gpus_per_job",
                "0", "--no_wait", "--", *long])
    assert rc == 0
    folder = str(out / ".submitit" / "%j")
    job = [sys.executable, "-u", "-m", "submitit.core._submit", folder]
    job_id = json.loads((out / "run_table.json").read_text())["slurm_jobs"]["vit_tiny_patch16_224/vtab/eurosat/dtl"]
    assert job_id == "4242"  # a single run is a plain job (submitit submits arrays for two or more)
    env = _job_env(os.environ, job_id)
    run = _folder(out, "eurosat", "dtl")
    first = subprocess.Popen(job, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.time() + 180
    while not (run / "last.pth").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert (run / "last.pth").exists(), first.communicate()[0]
    first.send_signal(signal.SIGUSR2)
    text = first.communicate(timeout=120)[0]
    assert "requeue 4242" in (slurm / "scontrol_calls").read_text(), text
    assert not (run / "results.json").exists()
    # the requeued task
    second = subprocess.run(job, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    log = (run / "run_table.log").read_text()
    assert log.count("=== run_table") == 2 and "--resume" in log.split("=== run_table")[2]
    assert json.loads((run / "results.json").read_text())["epochs"] == 31
    # the table of the finished array
    (slurm / "states").write_text("4242|COMPLETED|localhost\n")
    assert _main(["--output_root", out, "--collect"]) == 0
    assert "| done |" in (out / "status.md").read_text() and (out / "table.md").is_file()


# ------------------------------------------------------------------------------------------------ aggregate
def _result(root: Path, name: str, dataset: str, method: str, top1: float, backbone="vit_base_patch16_224_in21k"):
    d = root / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(dict(benchmark="vtab", dataset=dataset, method=method, top1=top1,
                                                    backbone=backbone, per_seed=[{"seed": 42, "top1": top1}])))


def test_aggregate_paper_numbers_beside_cells(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import make_launchers

    root = tmp_path / "runs"
    for i, (task, v) in enumerate(make_launchers.PAPER_DTL_VIT_VTAB.items()):
        _result(root, f"dtl_{i}", task, "dtl", v + (0.5 if task == "cifar_100" else 0.0))
    _result(root, "plus", "dtd", "dtl+", 70.0)
    _result(root, "tiny", "dtd", "dtl", 50.0, backbone="vit_tiny_patch16_224")
    assert aggregate.main([str(root), "--paper", "--fig_dir", str(tmp_path / "figs")]) == 0
    md = (root / "aggregate.md").read_text()
    row = next(l for l in md.splitlines() if l.startswith("| vit_base_patch16_224_in21k | dtl |"))
    assert "| 70.1 (69.6, +0.5) |" in row and "| 71.3 (71.3, +0.0) |" in row
    # the mean of the group means beside the paper's 76.7 (ours from the per-task numbers: 76.76 + 0.5/7/3)
    assert re.search(r"\| 76\.8 \(76\.7, \+0\.1\) \|", row)
    plus = next(l for l in md.splitlines() if l.startswith("| vit_base_patch16_224_in21k | dtl+ |"))
    assert "(77.7, " in plus and "| 70.0 |" in plus  # no per-task DTL+ number in the repository
    tiny = next(l for l in md.splitlines() if l.startswith("| vit_tiny_patch16_224 | dtl |"))
    assert "(" not in tiny  # published numbers are for the paper's backbone only
    rows = (root / "aggregate_paper.csv").read_text().splitlines()
    assert rows[0] == "table,backbone,method,column,ours,paper,difference"
    assert "vtab,vit_base_patch16_224_in21k,dtl,cifar_100,70.1,69.6,0.5" in rows
    # without --paper the tables are unchanged
    assert aggregate.main([str(root), "--fig_dir", str(tmp_path / "figs")]) == 0
    assert "(69.6" not in (root / "aggregate.md").read_text()
