"""The 136 launchers: generated from hparams.tsv, and each one, *run by bash*, hands train.py exactly the
table's settings (read back with train.py's own parser), honours DATA_DIR/LOAD_PATH/NPROC from the environment
and passes extra arguments through."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_train import REPO

sys.path.insert(0, str(REPO / "tools"))
import make_launchers  # noqa: E402

ROWS = make_launchers.read_table()
# SHA-256 of the table transcribed from the 136 original launchers: the copy here must stay that table.
TABLE_SHA256 = "81675862912e08370043b92843de798e84623168f933aea146adc462bc9a8195"


def _fake_python(tmp_path: Path) -> Path:
    """An interpreter stand-in that records its arguments (NUL-separated) instead of running anything."""
    fake = tmp_path / "fake_python"
    fake.write_text('#!/usr/bin/env bash\nprintf \'%s\\0\' "$@" > "$ARGS_OUT"\n')
    fake.chmod(0o755)
    return fake


def _run_launcher(rel: str, tmp_path: Path, env_extra=None, extra_args=(), cwd=None):
    out = tmp_path / "argv.bin"
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "LOAD_PATH", "NPROC", "TORCHRUN_ARGS")}
    env.update(PYTHON=str(_fake_python(tmp_path)), ARGS_OUT=str(out), **(env_extra or {}))
    proc = subprocess.run(["bash", str(REPO / rel), *extra_args], env=env, cwd=cwd or tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes().decode().split("\0")[:-1]


def test_table_copy_matches_the_projects_table():
    assert hashlib.sha256((REPO / "train_scripts" / "hparams.tsv").read_bytes()).hexdigest() == TABLE_SHA256


def test_table_has_all_136_original_launchers():
    paths = [make_launchers.launcher_path(r) for r in ROWS]
    assert len(paths) == len(set(paths)) == 136
    counts = {}
    for r in ROWS:
        key = (r["backbone"], r["benchmark"])
        counts[key] = counts.get(key, 0) + 1
    assert counts == {("vit", "vtab"): 38, ("swin", "vtab"): 38, ("vit", "few_shot"): 50,
                      ("vit", "domain_generalization"): 10}


def test_generated_launchers_are_up_to_date():
    assert make_launchers.main(["--check"]) == 0


def test_check_detects_an_edited_launcher(tmp_path, monkeypatch, capsys):
    """--check compares file contents: a copy of the tree with one changed lr fails it."""
    import shutil

    tree = tmp_path / "repo"
    shutil.copytree(REPO / "train_scripts", tree / "train_scripts")
    victim = tree / make_launchers.launcher_path(ROWS[0])
    victim.write_text(victim.read_text().replace(f"--lr {ROWS[0]['lr']} ", "--lr 0.1234 "))
    monkeypatch.setattr(make_launchers, "REPO", str(tree))
    monkeypatch.setattr(make_launchers, "SCRIPTS", str(tree / "train_scripts"))
    assert make_launchers.main(["--check"]) == 1
    assert "differs from the table" in capsys.readouterr().out


def _expect(row):
    model = {"vit": "vit_base_patch16_224_in21k", "swin": "swin_base_patch4_window7_224_in22k"}[row["backbone"]]
    return dict(
        benchmark=row["benchmark"], dataset=row["dataset"], model=model, method="dtl",
        shot=int(row["shot"]) if row["shot"] else (16 if row["benchmark"] == "domain_generalization" else None),
        lr=float(row["lr"]), drop_path=float(row["drop_path"]), fusion_size=int(row["fusion_size"]),
        r=int(row["r"]), beta=float(row["beta"]), lora_before_blocks=row["csn_blocks"],
        add_after_blocks=row["add_back_blocks"], weight_decay=float(row["weight_decay"]),
        epochs=int(row["epochs"]), warmup_epochs=int(row["warmup_epochs"]), batch_size=int(row["batch_size"]),
        batch_size_test=int(row["batch_size_test"]), amp=row["amp"] == "yes", prefetcher=True,
    )


def test_every_launcher_passes_the_tables_settings(tmp_path):
    from cli.flags import parse_args

    defaults = {"vtab": "/path/to/VTAB/vtab-1k", "few_shot": "/path/to/FGFS", "domain_generalization": "/path/to/DG"}
    for row in ROWS:
        rel = make_launchers.launcher_path(row)
        argv = _run_launcher(rel, tmp_path)
        assert argv[0] == str(REPO / "train.py"), rel
        args = parse_args(argv[1:])
        got = {k: getattr(args, k) for k in _expect(row)}
        assert got == _expect(row), rel
        assert args.data_dir == defaults[row["benchmark"]], rel
        assert args.load_path == ("timm" if row["backbone"] == "swin" else "/path/to/ViT-B_16.npz"), rel
        assert (args.method, args.fusion_size > 0) == ("dtl", row["method"] == "dtl+"), rel
        if row["benchmark"] != "vtab":
            assert args.seeds == [0, 1, 2], rel
        text = (REPO / rel).read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and os.access(REPO / rel, os.X_OK), rel
        assert "Paper" in text, rel


def test_paper_numbers_in_vit_vtab_dtl_launchers():
    for row in ROWS:
        if (row["backbone"], row["benchmark"], row["method"]) == ("vit", "vtab", "dtl"):
            text = (REPO / make_launchers.launcher_path(row)).read_text()
            number = make_launchers.PAPER_DTL_VIT_VTAB[row["dataset"]]
            assert f"{number:.1f} top-1" in text
    assert make_launchers.PAPER_DTL_VIT_VTAB["cifar_100"] == 69.6  # the paper (docs/method.md)
    assert make_launchers.PAPER_DTL_VIT_VTAB["smallnorb_ele"] == 47.1


def test_environment_overrides_and_pass_through(tmp_path):
    from cli.flags import parse_args

    rel = "train_scripts/vit/vtab/cifar_100/train_dtl.sh"
    other = tmp_path / "elsewhere"
    other.mkdir()
    argv = _run_launcher(rel, tmp_path, env_extra={"DATA_DIR": "/data/my vtab", "LOAD_PATH": ""},
                         extra_args=["--epochs", "1", "--output_dir", "out dir"], cwd=other)
    args = parse_args(argv[1:])
    assert args.data_dir == "/data/my vtab"  # spaces survive
    assert args.load_path == ""  # set-but-empty overrides: random initialisation
    assert args.epochs == 1 and args.output_dir == "out dir"  # the last occurrence wins
    assert args.lr == 0.0003


@pytest.mark.parametrize("exitcodes, status", [
    ([143, 2], 2),     # rank 1's error: (exit 2) made the agent stop rank 0 with SIGTERM: the error is the status
    ([-15, 2], 2),     # the same, rank 0 ended by the signal itself
    ([130, 130], 130),  # every process interrupted
    ([143, 143], 143),
    ([-9], 137),       # killed: 128 + the signal
    ([0, 1], 1),
    ([], 1),
])
def test_torchrun_wrapper_exits_with_the_failed_processs_own_status(exitcodes, status):
    from tools.torchrun import child_status

    assert child_status(exitcodes) == status


def test_nproc_runs_torchrun(tmp_path):
    rel = "train_scripts/vit/few_shot/food101-FS/train_dtl+_shot_4.sh"
    argv = _run_launcher(rel, tmp_path, env_extra={"NPROC": "2", "TORCHRUN_ARGS": "--nnodes 1"})
    assert argv[:4] == [str(REPO / "tools" / "torchrun.py"), "--nproc_per_node", "2", "--nnodes"]
    assert argv[5:7] == ["--", str(REPO / "train.py")]


TORCHRUN_ARGS = "--nnodes 1 --node_rank 0 --master_addr 127.0.0.1 --master_port 29517"


def test_every_launcher_survives_torchruns_parser(tmp_path):
    """NPROC=2 + multi-node TORCHRUN_ARGS, for all 136 launchers: torchrun's own parser (the installed torch's)
    reads its options and hands train.py the launcher's flags untouched ("--r" and every other train.py flag are
    not taken for abbreviations of torchrun options), and train.py's parser reads the table's settings."""
    from torch.distributed.run import parse_args as torchrun_parse
    from cli.flags import parse_args

    for row in ROWS:
        rel = make_launchers.launcher_path(row)
        argv = _run_launcher(rel, tmp_path, env_extra={"NPROC": "2", "TORCHRUN_ARGS": TORCHRUN_ARGS})
        assert argv[0] == str(REPO / "tools" / "torchrun.py"), rel  # torchrun's arguments, after the wrapper
        tr = torchrun_parse(argv[1:])
        assert (tr.nproc_per_node, tr.nnodes, tr.node_rank, tr.master_addr, tr.master_port) == \
            ("2", "1", 0, "127.0.0.1", 29517), rel
        assert tr.training_script == str(REPO / "train.py"), rel
        args = parse_args(tr.training_script_args, world_size=2)
        assert {k: getattr(args, k) for k in _expect(row)} == _expect(row), rel
    # the check can fail: the same command line without the "--" separator is refused by torchrun's parser
    i = argv.index("--")
    with pytest.raises(SystemExit):
        torchrun_parse(argv[1:i] + argv[i + 1:])


def test_launcher_execs_the_training_process(tmp_path):
    """The launcher exec's its interpreter: the launcher's PID *is* the training process, so a signal sent to
    it (kill -9 included) ends the training instead of orphaning it. Checked with a stand-in interpreter that
    records its PID and then sleeps, and with the real interpreter (its command line is python train.py)."""
    import signal
    import time

    rel = "train_scripts/vit/few_shot/food101-FS/train_dtl+_shot_4.sh"
    fake = tmp_path / "sleepy_python"
    fake.write_text('#!/usr/bin/env bash\necho $$ > "$PID_OUT"\nexec sleep 60\n')
    fake.chmod(0o755)
    pid_out = tmp_path / "pid"
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "TORCHRUN_ARGS")}
    proc = subprocess.Popen(["bash", str(REPO / rel)], env=dict(env, PYTHON=str(fake), PID_OUT=str(pid_out)))
    try:
        deadline = time.time() + 20
        while not (pid_out.exists() and pid_out.read_text().strip()) and time.time() < deadline:
            time.sleep(0.02)
        assert int(pid_out.read_text()) == proc.pid  # the interpreter runs under the launcher's own PID
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        time.sleep(0.1)
        leftovers = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p)[:2] == ["sleep", "60"]
                     and _environ_has(p, str(pid_out))]
        assert leftovers == []  # nothing orphaned
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    for nproc, marker in (("1", str(REPO / "train.py")), ("2", str(REPO / "tools" / "torchrun.py"))):
        proc = subprocess.Popen(["bash", str(REPO / rel), "--output_dir", str(tmp_path / f"never{nproc}")],
                                env=dict(env, PYTHON=sys.executable, NPROC=nproc, DATA_DIR=str(tmp_path)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 20
            while marker not in _cmdline(str(proc.pid)) and time.time() < deadline and proc.poll() is None:
                time.sleep(0.01)
            cmd = _cmdline(str(proc.pid))
            assert os.path.basename(cmd[0]).startswith("python") and marker in cmd, cmd
        finally:
            proc.kill()
            proc.wait()


def _cmdline(pid: str):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _environ_has(pid: str, needle: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle.encode() in f.read()
    except OSError:
        return False


def test_bad_nproc_is_refused(tmp_path):
    env = dict(os.environ, PYTHON=str(_fake_python(tmp_path)), ARGS_OUT=str(tmp_path / "x"), NPROC="two")
    proc = subprocess.run(["bash", str(REPO / "train_scripts/vit/vtab/dtd/train_dtl.sh")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "NPROC must be a positive integer" in proc.stderr
