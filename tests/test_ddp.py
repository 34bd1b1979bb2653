"""torchrun with two CPU processes (gloo) trains the same model as one process with the same global batch, counts
every test image exactly once, and only rank 0 writes.

Why the comparison is meaningful: the training sampler is a ``DistributedSampler`` also in one process, seeded by
``seed + epoch``, so the global batch k of the two-process run (rank r takes ``perm[r::2]``) holds the same
images as batch k of the one-process run; the model is initialised from the same seed on every rank (and DDP
broadcasts rank 0's weights); drop_path is 0 and the VTAB transform is deterministic, so nothing random differs
between ranks. The loss is a per-batch mean, so DDP's gradient average equals the one-process gradient up to
float summation order. Measured difference of the trained deltas: ~2e-6 (tolerance 2e-5), against ~0.1 for a run
with another global batch (which the test also checks, so a broken split cannot pass).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import REPO, TINY, load_delta, read_results, read_summary, run_train, strip_timing, vtab_root

ATOL = 2e-5


@pytest.fixture(scope="session")
def vtab(tmp_path_factory):
    return vtab_root(tmp_path_factory)


def _argv(root, out, batch=8):
    return ["--data_dir", root, "--dataset", "cifar_100", *TINY, "--epochs", "2", "--warmup_epochs", "0",
            "--batch_size", str(batch), "--lr", "1e-2", "--drop_path", "0", "--output_dir", str(out)]


@pytest.fixture(scope="module")
def ddp_run(vtab, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "train.py"), *_argv(vtab, out)],
        env=env, cwd=str(out.parent), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_two_processes_match_one_process(ddp_run, vtab, tmp_path):
    two, _ = ddp_run
    one = tmp_path / "one"
    assert run_train(_argv(vtab, one)) == 0
    d1, d2 = load_delta(one / "delta.pth")["delta"], load_delta(two / "delta.pth")["delta"]
    assert sorted(d1) == sorted(d2)
    for k in d1:
        assert torch.allclose(d1[k], d2[k], atol=ATOL, rtol=0), (k, (d1[k] - d2[k]).abs().max())
    assert d1["side.taps.6.lora_B"].abs().max() > 1e-3  # the side network really trained

    r1, r2 = strip_timing(read_summary(one)), strip_timing(read_summary(two))
    for a, b in zip(r1, r2):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-5)
        assert a["lr"] == b["lr"]
    res1, res2 = read_results(one), read_results(two)
    assert res2["world_size"] == 2 and res1["world_size"] == 1
    assert res2["top1"] == pytest.approx(res1["top1"])

    # the comparison can fail: another global batch gives clearly different weights
    other = tmp_path / "other"
    assert run_train(_argv(vtab, other, batch=4)) == 0
    d3 = load_delta(other / "delta.pth")["delta"]
    assert max((d3[k] - d2[k]).abs().max().item() for k in d3) > 100 * ATOL


def test_every_test_image_counted_once(ddp_run, vtab):
    two, _ = ddp_run
    n_test = sum(1 for line in open(os.path.join(vtab, "cifar", "test.txt")) if line.strip())
    assert n_test % 2 == 1  # an odd count: padding would count one image twice
    assert read_results(two)["n_test_images"] == {"test": n_test}


def test_only_rank_zero_writes(ddp_run):
    two, proc = ddp_run
    assert sorted(n for n in os.listdir(two) if not n.startswith("events")) == sorted(
        ["config.yaml", "delta.pth", "last.pth", "log.txt", "results.json", "summary.csv"])
    assert sum(1 for n in os.listdir(two) if n.startswith("events")) == 1
    log = open(two / "log.txt").read()
    assert log.count("run folder:") == 1 and log.count("epoch 2/2") == 1
    assert [r["epoch"] for r in read_summary(two)] == ["1", "2"]


def test_batch_must_split_evenly(vtab, tmp_path, monkeypatch):
    from cli.flags import UsageError, parse_args

    with pytest.raises(UsageError, match="not divisible by the 2 processes"):
        parse_args(["--dataset", "cifar_100", "--batch_size", "7"], world_size=2)
