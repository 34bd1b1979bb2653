"""Reliability under faults and hostile input (issue 14): the run-folder lock, checksummed checkpoints, data and
backbone fingerprints, resuming a finished run, flags that cannot be meant, non-finite numbers, failed writes and
the error policy. Every case is reproduced on a tiny ViT and generated data."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import (
    REPO, TINY, Killed, copy_root, kill_after, read_results, read_summary, result_files, run_train, vtab_root,
)
from models.backbones import create_backbone
from models.hub import delta_folder_next_to
from utils.checkpoint import content_checksum, save_checkpoint


@pytest.fixture(scope="module")
def vtab(tmp_path_factory):
    return vtab_root(tmp_path_factory)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Two backbone files of the same shapes but other weights (A, B), and A again as .safetensors."""
    d = tmp_path_factory.mktemp("backbones")
    out = {}
    for name, seed in (("A", 0), ("B", 1)):
        torch.manual_seed(seed)
        sd = create_backbone("vit_tiny_patch16_224", img_size=32).state_dict()
        out[name] = str(d / f"backbone_{name}.pth")
        torch.save(sd, out[name])
        if name == "A":
            out["A_safetensors"] = str(d / "backbone_A.safetensors")
            save_file({k: v.contiguous() for k, v in sd.items()}, out["A_safetensors"])
    return out


def _argv(root, out, load_path="", *extra):
    return ["--data_dir", root, "--dataset", "cifar_100", *TINY, "--epochs", "1", "--warmup_epochs", "1",
            "--batch_size", "8", "--lr", "1e-2", "--fusion_size", "3", "--load_path", load_path,
            "--output_dir", out, *extra]


def _eval_argv(root, out, checkpoint, load_path, *extra):
    return ["--data_dir", root, "--dataset", "cifar_100", "--num_workers", "0", "--batch_size_test", "16",
            "--load_path", load_path, "--eval_only", "--checkpoint", checkpoint, "--output_dir", out, *extra]


@pytest.fixture(scope="module")
def ref(vtab, backbones, tmp_path_factory):
    """A finished DTL+ run on backbone A."""
    out = tmp_path_factory.mktemp("rel_ref") / "run"
    assert run_train(_argv(vtab, out, backbones["A"])) == 0
    return out


def _snapshot(folder):
    snap = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                snap[os.path.relpath(p, folder)] = (os.stat(p).st_mtime_ns, f.read())
    return snap


def _killed_run(vtab, backbones, out):
    argv = _argv(vtab, out, backbones["A"])
    with kill_after(0, 1), pytest.raises(Killed):
        run_train(argv)
    assert os.path.isfile(out / "last.pth")
    return argv + ["--resume", out / "last.pth"]


# ----------------------------------------------------------------------------------------------- 1. the lock
def _hold_lock(folder):
    code = ("import sys, time; sys.path.insert(0, %r); from utils.runlock import RunLock; RunLock(%r).acquire(); "
            "print('locked', flush=True); time.sleep(120)" % (str(REPO), str(folder)))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_healthy_run_leaves_the_usual_files_and_no_lock(ref):
    names = sorted(os.listdir(ref))
    assert ".lock" not in names
    assert {"config.yaml", "delta.pth", "last.pth", "log.txt", "results.json", "summary.csv"} <= set(names)
    assert not any(n.endswith(".tmp") or n.startswith(".") for n in names)


def test_second_process_and_resume_refused_while_the_run_holds_the_folder(vtab, backbones, tmp_path, caplog):
    out = tmp_path / "run"
    resume_argv = _killed_run(vtab, backbones, out)
    before = _snapshot(out)
    holder = _hold_lock(out)
    try:
        caplog.clear()
        assert run_train(resume_argv) == 2
        assert f"is in use by another run: pid {holder.pid} on host" in caplog.text
        assert "since" in caplog.text
        caplog.clear()
        assert run_train(_argv(vtab, out, backbones["A"])) == 2  # a second start in the same folder
        assert f"pid {holder.pid}" in caplog.text
        after = _snapshot(out)
        assert {k: v for k, v in after.items() if k != ".lock"} == before  # nothing written, log.txt untouched
    finally:
        holder.kill()  # kill -9: the lock file stays behind, stale
        holder.wait()
    assert os.path.isfile(out / ".lock")
    caplog.clear()
    assert run_train(resume_argv) == 0
    assert f"taking over the stale lock of pid {holder.pid}" in caplog.text
    assert os.path.isfile(out / "results.json") and not os.path.exists(out / ".lock")


def test_two_train_processes_in_one_folder(vtab, backbones, tmp_path):
    """A second train.py process started while the first trains in the same --output_dir is refused at once."""
    out = tmp_path / "run"
    argv = [sys.executable, str(REPO / "train.py"), *map(str, _argv(vtab, out, backbones["A"], "--epochs", "2000"))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.exists(out / "summary.csv") and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None
        second = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert first.poll() is None  # still training
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"is in use by another run: pid {first.pid} on host" in second.stdout
    assert second.stdout.count("error:") == 1 and "Traceback" not in second.stdout + second.stderr


# ------------------------------------------------------------------------------------- 3. data fingerprints
def test_resume_on_other_data_is_refused(vtab, backbones, tmp_path, caplog):
    from data.synthetic import make_vtab_root

    out = tmp_path / "run"
    resume_argv = _killed_run(vtab, backbones, out)
    other = make_vtab_root(str(tmp_path / "other"), tasks=("cifar_100",), n_train=24, n_val=8, n_test=23,
                           img_size=32, seed=5)
    argv = list(resume_argv)
    argv[argv.index("--data_dir") + 1] = other
    caplog.clear()
    assert run_train(argv) == 2
    assert "trained on other data" in caplog.text and "seed 0 train: list file content differs" in caplog.text
    assert result_files(out) == []

    fewer = copy_root(vtab, tmp_path / "fewer")
    test_list = os.path.join(fewer, "cifar", "test.txt")
    if not os.path.isfile(test_list):
        test_list = next(os.path.join(r, "test.txt") for r, _, f in os.walk(fewer) if "test.txt" in f)
    lines = open(test_list).read().splitlines()
    with open(test_list, "w") as f:
        f.write("\n".join(lines[:-3]) + "\n")
    argv[argv.index("--data_dir") + 1] = fewer
    caplog.clear()
    assert run_train(argv) == 2
    assert "seed 0 test:test: list file content differs" in caplog.text and "images 23 then, 20 now" in caplog.text
    assert len(read_summary(out)) == 1  # unchanged

    assert run_train(resume_argv) == 0  # the right data resumes


# ------------------------------------------------------------------------------------ 4. a finished run
def test_resuming_a_finished_run_changes_nothing(ref, caplog, vtab, backbones):
    before = _snapshot(ref)
    caplog.clear()
    assert run_train(_argv(vtab, ref, backbones["A"]) + ["--resume", ref / "last.pth"]) == 0
    assert "is complete" in caplog.text and "nothing to do" in caplog.text
    assert "seed 2/1" not in caplog.text
    assert _snapshot(ref) == before


# ------------------------------------------------------------------------------------------- 5. checksums
def _doubled(src, dst, key_path):
    ck = torch.load(src, weights_only=True)
    t = ck
    for k in key_path:
        t = t[k]
    name = next(n for n, v in t.items() if v.is_floating_point() and v.numel() >= 10 and v.abs().sum() > 0)
    t[name].view(-1)[:10] *= 2  # ten floats doubled, the stored checksum kept
    torch.save(ck, dst)


@pytest.mark.parametrize("damage", ["doubled", "truncated", "empty", "garbage"])
def test_damaged_checkpoints_are_refused(ref, vtab, backbones, tmp_path, caplog, damage):
    for name, key_path in (("delta.pth", ("delta",)), ("last.pth", ("trainer", "model_delta"))):
        src, bad = ref / name, tmp_path / name
        if damage == "doubled":
            if name == "last.pth":  # a finished run's last.pth holds no trainer: damage its summary rows' values
                ck = torch.load(src, weights_only=True)
                ck["rng_states"][0]["torch"][:10] ^= 1
                torch.save(ck, bad)
            else:
                _doubled(src, bad, key_path)
        elif damage == "truncated":
            data = src.read_bytes()
            bad.write_bytes(data[: len(data) // 2])
        elif damage == "empty":
            bad.write_bytes(b"")
        else:
            bad.write_bytes(os.urandom(4096))
        out = tmp_path / f"out_{name}"
        argv = (_eval_argv(vtab, out, bad, backbones["A"]) if name == "delta.pth"
                else _argv(vtab, out, backbones["A"]) + ["--resume", bad])
        caplog.clear()
        assert run_train(argv) == 2, caplog.text
        assert f"corrupt or truncated: {bad} (" in caplog.text, caplog.text
        assert "Traceback" not in caplog.text
        assert not os.path.exists(out)
        caplog.clear()
        assert run_train(_argv(vtab, out, backbones["A"]) + ["--initial_checkpoint", bad]) == 2
        assert f"corrupt or truncated: {bad} (" in caplog.text and not os.path.exists(out)


def test_old_delta_without_checksum_or_fingerprint_still_loads(ref, vtab, backbones, tmp_path, caplog):
    ck = torch.load(ref / "delta.pth", weights_only=True)
    assert ck["checksum"] == content_checksum(ck)
    for k in ("checksum", "backbone_weights", "model_spec"):  # a file of the layout before model specs
        ck.pop(k)
    old = tmp_path / "old_delta.pth"
    torch.save(ck, old)
    caplog.clear()
    assert run_train(_eval_argv(vtab, tmp_path / "ev", old, backbones["A"])) == 0
    assert "has no checksum" in caplog.text and "does not record the backbone weights" in caplog.text
    assert read_results(tmp_path / "ev")["top1"] == read_results(ref)["top1"]


# -------------------------------------------------------------------------------------- 6. non-finite numbers
def _resealed(src, dst, change):
    ck = torch.load(src, weights_only=True)
    change(ck["delta"])
    save_checkpoint(ck, dst)  # a consistent file: the damage is in what was saved
    return dst


def test_nan_in_a_delta_is_refused(ref, vtab, backbones, tmp_path, caplog):
    bad = _resealed(ref / "delta.pth", tmp_path / "nan.pth", lambda d: d["head.bias"].__setitem__(0, float("nan")))
    caplog.clear()
    assert run_train(_eval_argv(vtab, tmp_path / "ev", bad, backbones["A"])) == 2
    assert "non-finite values (NaN or inf)" in caplog.text and "head.bias" in caplog.text
    assert result_files(tmp_path / "ev") == []


def test_non_finite_logits_in_evaluation_write_no_result(ref, vtab, backbones, tmp_path, caplog):
    bad = _resealed(ref / "delta.pth", tmp_path / "huge.pth", lambda d: d["head.weight"].fill_(3e38))
    out = tmp_path / "ev"
    caplog.clear()
    assert run_train(_eval_argv(vtab, out, bad, backbones["A"])) == 1
    assert "non-finite logits (NaN or inf)" in caplog.text
    assert not os.path.exists(out / "results.json")
    log = (out / "log.txt").read_text()
    assert log.count("error:") == 1 and "non-finite logits" in log.strip().splitlines()[-1]


def _predict(argv, capsys):
    from tools import predict

    code = predict.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_predict_refuses_nan_deltas_and_nan_logits(ref, vtab, backbones, tmp_path, capsys):
    img = os.path.join(vtab, next(d for d in os.listdir(vtab) if os.path.isdir(os.path.join(vtab, d))))
    nan = _resealed(ref / "delta.pth", tmp_path / "nan.pth", lambda d: d["head.bias"].__setitem__(0, float("nan")))
    out = tmp_path / "pred.csv"
    code, err = _predict(["--load_path", backbones["A"], "--deltas", nan, "--images", img, "--output", out], capsys)
    assert code == 2 and "non-finite values" in err and not out.exists()
    huge = _resealed(ref / "delta.pth", tmp_path / "huge.pth", lambda d: d["head.weight"].fill_(3e38))
    code, err = _predict(["--load_path", backbones["A"], "--deltas", huge, "--images", img, "--output", out], capsys)
    assert code == 1 and "non-finite logits" in err and not out.exists()
    bad = tmp_path / "trunc.pth"
    bad.write_bytes((ref / "delta.pth").read_bytes()[:100])
    code, err = _predict(["--load_path", backbones["A"], "--deltas", bad, "--images", img], capsys)
    assert code == 2 and f"corrupt or truncated: {bad}" in err


# ----------------------------------------------------------------------------------- 7. backbone fingerprints
def test_delta_on_another_backbone_is_refused(ref, vtab, backbones, tmp_path, caplog, capsys):
    ck = torch.load(ref / "delta.pth", weights_only=True)
    assert ck["backbone_weights"]["file"] == "backbone_A.pth"
    assert ck["backbone_weights"]["fingerprint"].startswith("sha256:")
    caplog.clear()
    assert run_train(_eval_argv(vtab, tmp_path / "b", ref / "delta.pth", backbones["B"])) == 2
    assert "trained on backbone weights backbone_A.pth" in caplog.text and "backbone_B.pth" in caplog.text
    assert "--allow_backbone_mismatch" in caplog.text and not os.path.exists(tmp_path / "b")

    caplog.clear()
    assert run_train(_eval_argv(vtab, tmp_path / "b2", ref / "delta.pth", backbones["B"],
                                "--allow_backbone_mismatch")) == 0
    assert "--allow_backbone_mismatch: " in (tmp_path / "b2" / "log.txt").read_text()

    # the same weights in another file format are the same backbone
    assert run_train(_eval_argv(vtab, tmp_path / "st", ref / "delta.pth", backbones["A_safetensors"])) == 0
    assert read_results(tmp_path / "st")["top1"] == read_results(ref)["top1"]

    # --initial_checkpoint: a delta trained on A does not start a run on B (unless allowed)
    caplog.clear()
    assert run_train(_argv(vtab, tmp_path / "init", backbones["B"], "--initial_checkpoint", ref / "delta.pth")) == 2
    assert "trained on backbone weights backbone_A.pth" in caplog.text and not os.path.exists(tmp_path / "init")
    assert run_train(_argv(vtab, tmp_path / "init2", backbones["B"], "--initial_checkpoint", ref / "delta.pth",
                           "--allow_backbone_mismatch")) == 0
    assert "--allow_backbone_mismatch: " in (tmp_path / "init2" / "log.txt").read_text()
    assert run_train(_argv(vtab, tmp_path / "init3", backbones["A"], "--initial_checkpoint", ref / "delta.pth")) == 0

    img = os.path.join(vtab, next(d for d in os.listdir(vtab) if os.path.isdir(os.path.join(vtab, d))))
    code, err = _predict(["--load_path", backbones["B"], "--deltas", ref / "delta.pth", "--images", img], capsys)
    assert code == 2 and "trained on backbone weights backbone_A.pth" in err
    code, err = _predict(["--load_path", backbones["B"], "--deltas", ref / "delta.pth", "--images", img,
                          "--allow_backbone_mismatch"], capsys)
    assert code == 0 and "--allow_backbone_mismatch: " in err


# --------------------------------------------------------------------------------------- 8. flag validation
@pytest.mark.parametrize("extra,needle", [
    (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    (["--lr", "-1"], "--lr must be >= 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--mixup_prob", "1.5"], "--mixup_prob must lie in [0, 1]"),
    (["--lora_before_blocks", "8-11", "--add_after_blocks", "2-5"], "no tapped block comes at or before"),
])
def test_flags_that_cannot_be_meant(vtab, backbones, tmp_path, caplog, extra, needle):
    out = tmp_path / "run"
    caplog.clear()
    assert run_train(_argv(vtab, out, backbones["A"], *extra)) == 2
    assert needle in caplog.text and "error:" in caplog.text
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------------------- 11. failed writes
def test_failed_write_names_the_file_and_the_reason(vtab, backbones, tmp_path):
    """A file-size limit makes the writes fail like a full disk (EFBIG instead of ENOSPC)."""
    out = tmp_path / "run"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, _argv(vtab, out, backbones["A"]))],
                          cwd=REPO, preexec_fn=limit, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"error: could not write {out / 'last.pth'}: File too large" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "could not write" in (out / "log.txt").read_text()
    names = os.listdir(out)
    assert "last.pth" not in names and not [n for n in names if n.startswith(".")], names  # no partial/temp file


def test_atomic_writers_report_the_os_reason(tmp_path):
    from utils.atomic import WriteError, atomic_write_text
    from utils.checkpoint import atomic_torch_save

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WriteError, match=r"could not write .*file/sub/a.txt: Not a directory"):
        atomic_write_text(str(blocker / "sub" / "a.txt"), "hello")
    code = ("import resource, signal, sys, torch; sys.path.insert(0, %r)\n"
            "from utils.checkpoint import atomic_torch_save\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (10000, 10000))\n"
            "try:\n    atomic_torch_save({'a': torch.zeros(100000)}, %r)\n"
            "except OSError as e:\n    print(type(e).__name__, e)\n" % (str(REPO), str(tmp_path / "big.pth")))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == f"WriteError could not write {tmp_path / 'big.pth'}: File too large", proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["file"]  # neither the file nor its temporary
    assert atomic_torch_save.__module__ == "utils.checkpoint"


# ----------------------------------------------------------------------------------------- 13. error policy
def test_a_bug_keeps_its_traceback_and_logs_it(vtab, backbones, tmp_path, monkeypatch):
    from engine.trainer import Trainer

    def broken(self, loader, epoch):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(Trainer, "train_one_epoch", broken)
    with pytest.raises(ZeroDivisionError):
        run_train(_argv(vtab, tmp_path / "run", backbones["A"]))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "internal error (a bug" in log and "Traceback" in log and "ZeroDivisionError: simulated bug" in log
    assert not os.path.exists(tmp_path / "run" / ".lock")


def test_output_dir_that_is_a_file_is_one_error_line(vtab, backbones, tmp_path, caplog, monkeypatch):
    import train

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("built a model before the check"))
    caplog.clear()
    assert run_train(_argv(vtab, blocker, backbones["A"])) == 2
    assert f"error: could not write {blocker}: it exists and is not a folder" in caplog.text
    assert blocker.read_text() == "x"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_error_line(vtab, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, _argv(vtab, tmp_path / "r")),
                           "--device", "cuda"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error: --device cuda: CUDA is not available" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


# -------------------------------------------------------------------------------------------- 14. smaller
@pytest.mark.parametrize("kind", ["garbage", "truncated_npz", "empty", "wrong_shapes"])
def test_bad_load_path_leaves_no_run_folder(vtab, backbones, tmp_path, caplog, kind):
    bad = tmp_path / ("w.npz" if kind == "truncated_npz" else "w.pth")
    if kind == "garbage":
        bad.write_bytes(b"not a checkpoint at all" * 10)
    elif kind == "truncated_npz":
        import numpy as np

        np.savez(bad, a=np.zeros(1000))
        bad.write_bytes(bad.read_bytes()[:500])
    elif kind == "empty":
        bad.write_bytes(b"")
    else:
        torch.save({"pos_embed": torch.zeros(1, 3, 3)}, bad)
    out = tmp_path / "run"
    caplog.clear()
    assert run_train(_argv(vtab, out, str(bad))) == 2
    assert str(bad) in caplog.text
    assert not os.path.exists(out)


def test_eval_only_records_the_evaluated_model(ref, vtab, backbones, tmp_path):
    out = tmp_path / "ev"
    assert run_train(_eval_argv(vtab, out, ref / "delta.pth", backbones["A"], "--fusion_size", "0")) == 0
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "dtl" and cfg["fusion_size"] == 3
    res = read_results(out)
    assert res["method"] == "dtl+" and res["args"]["fusion_size"] == 3
    assert json.loads(json.dumps(res))["top1"] == read_results(ref)["top1"]


# --------------------------------------------------------- 5 + 7 for delta folders (config.json + safetensors)
def test_delta_folders_carry_the_checksum_and_the_backbone_record(ref, vtab, backbones, tmp_path, caplog):
    pth = tmp_path / "delta.pth"
    shutil.copy(ref / "delta.pth", pth)
    folder = delta_folder_next_to(str(pth))
    block = json.loads(open(os.path.join(folder, "config.json")).read())["dtl"]
    assert block["delta_sha256"].startswith("sha256:")
    assert block["trained_on_weights"]["file"] == "backbone_A.pth"

    # the folder evaluates like delta.pth on its own backbone, and is refused on another one
    assert run_train(_eval_argv(vtab, tmp_path / "ok", folder, backbones["A"])) == 0
    assert read_results(tmp_path / "ok")["top1"] == read_results(ref)["top1"]
    caplog.clear()
    assert run_train(_eval_argv(vtab, tmp_path / "other", folder, backbones["B"])) == 2
    assert "trained on backbone weights backbone_A.pth" in caplog.text and not os.path.exists(tmp_path / "other")

    # one changed byte in the tensors file: corrupt, nothing written
    data = bytearray(open(os.path.join(folder, "delta.safetensors"), "rb").read())
    data[-3] ^= 0xFF
    open(os.path.join(folder, "delta.safetensors"), "wb").write(bytes(data))
    caplog.clear()
    assert run_train(_eval_argv(vtab, tmp_path / "bad", folder, backbones["A"])) == 2
    assert "corrupt or truncated" in caplog.text and "delta.safetensors" in caplog.text
    assert not os.path.exists(tmp_path / "bad")
