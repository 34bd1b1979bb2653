"""train.py --lean / --cache_prefix (issue 7): the same training as the default path (summary.csv losses,
accuracy) up to the stated tolerances, the refusals (named flag, nothing that looks like a result), resume, and
the cache loader drawing the same batches as the image loader."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import (
    REPO, TINY, Killed, kill_after, load_delta, read_results, read_summary, result_files, run_train, strip_timing,
    vtab_root,
)

# Lean mode: the same forward; gradients differ only by the float32 summation order (models/lean.py).
LEAN_RTOL = 1e-5
# A float32 cache holds exactly the block inputs of the default path.
FP32_CACHE_RTOL = 1e-6
# A float16 cache rounds the cached block inputs to 11 significant bits (relative 2^-11 ~ 4.9e-4).
FP16_CACHE_RTOL = 5e-3


@pytest.fixture(scope="session")
def vtab(tmp_path_factory):
    return vtab_root(tmp_path_factory)


def _argv(root, out, *extra):
    # DTL+ (fusion) with the taps 0-11 and add-back 6-11 of ViT-Ti: the cache holds the inputs of blocks 0-6.
    return ["--data_dir", root, "--dataset", "cifar_100", *TINY, "--epochs", "2", "--warmup_epochs", "1",
            "--batch_size", "8", "--lr", "1e-2", "--fusion_size", "3", "--output_dir", out, *extra]


@pytest.fixture(scope="module")
def runs(vtab, tmp_path_factory):
    """The default run and the same run with each memory/speed flag."""
    base = tmp_path_factory.mktemp("lean_cache")
    modes = {
        "default": [],
        "lean": ["--lean"],
        "cache32": ["--cache_prefix", "--cache_dtype", "float32"],
        "cache16": ["--cache_prefix"],
        "lean_cache32": ["--lean", "--cache_prefix", "--cache_dtype", "float32", "--cache_storage", "mmap",
                         "--cache_dir", str(base)],
    }
    out = {}
    for name, extra in modes.items():
        out[name] = base / name
        assert run_train(_argv(vtab, out[name], *extra)) == 0, name
    return out


def _losses(run_dir):
    return [float(r["train_loss"]) for r in read_summary(run_dir)]


@pytest.mark.parametrize("mode,rtol", [("lean", LEAN_RTOL), ("cache32", FP32_CACHE_RTOL),
                                       ("lean_cache32", LEAN_RTOL)])
def test_same_training_as_default(runs, mode, rtol):
    ref, got = runs["default"], runs[mode]
    ref_losses, losses = _losses(ref), _losses(got)
    assert len(losses) == len(ref_losses) == 3
    assert losses[-1] != losses[0]  # training moved: the comparison is not between untrained models
    assert losses == pytest.approx(ref_losses, rel=rtol)
    assert read_results(got)["top1"] == read_results(ref)["top1"]
    da, db = load_delta(ref / "delta.pth")["delta"], load_delta(got / "delta.pth")["delta"]
    assert sorted(da) == sorted(db)
    for k in da:
        torch.testing.assert_close(db[k], da[k], rtol=1e-4, atol=1e-6, msg=k)


def test_fp16_cache_is_close(runs):
    ref, got = runs["default"], runs["cache16"]
    assert _losses(got) == pytest.approx(_losses(ref), rel=FP16_CACHE_RTOL)
    # at most one of the 23 test images classified differently
    assert abs(read_results(got)["top1"] - read_results(ref)["top1"]) <= 100.0 / 23 + 1e-9


def test_results_record_the_flags(runs):
    default = read_results(runs["default"])
    assert default["lean"] is False and default["cache_prefix"] is False
    assert default["cache_build_s"] is None and default["cache_mib"] is None
    assert read_results(runs["lean"])["lean"] is True
    res = read_results(runs["cache32"])
    assert res["cache_prefix"] is True and res["lean"] is False
    assert res["cache_storage"] == "host" and res["cache_approximate"] is False
    assert res["cache_build_s"] >= 0.0
    # 32 training images x inputs of blocks 0-6 (7) x 5 tokens x 192 channels x 4 bytes
    assert res["cache_mib"] == pytest.approx(32 * 7 * 5 * 192 * 4 / 2 ** 20, abs=1e-3)
    assert read_results(runs["cache16"])["cache_mib"] == pytest.approx(res["cache_mib"] / 2, abs=1e-3)
    mm = read_results(runs["lean_cache32"])
    assert mm["cache_storage"] == "mmap" and mm["lean"] is True
    log = open(runs["cache32"] / "log.txt").read()
    assert "prefix cache:" in log and "not counted in the epoch times" in log
    # the memory-mapped file is gone with the run
    assert not [n for n in os.listdir(runs["lean_cache32"].parent) if n.startswith("dtl_prefix_cache_")]


def test_two_processes_train_from_the_cache(runs, vtab, tmp_path):
    """torchrun (2 CPU processes, gloo): every rank builds the whole cache, the sampler splits each global batch,
    DDP gets the cached dict batches; the result is the one-process default run's."""
    out = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "train.py"), *map(str, _argv(vtab, out, "--cache_prefix", "--cache_dtype", "float32", "--lean"))],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = read_results(out)
    assert res["world_size"] == 2 and res["cache_prefix"] is True
    assert _losses(out) == pytest.approx(_losses(runs["default"]), rel=LEAN_RTOL)
    assert res["top1"] == read_results(runs["default"])["top1"]
    da, db = load_delta(runs["default"] / "delta.pth")["delta"], load_delta(out / "delta.pth")["delta"]
    for k in da:
        torch.testing.assert_close(db[k], da[k], rtol=1e-4, atol=1e-6, msg=k)


def test_eval_only_of_a_cache_run(runs, vtab, tmp_path):
    ckpt = runs["cache32"] / "delta.pth"
    out = tmp_path / "eval"
    argv = ["--data_dir", vtab, "--dataset", "cifar_100", *TINY, "--eval_only", "--checkpoint", ckpt,
            "--output_dir", out, "--cache_prefix", "--lean"]
    assert run_train(argv) == 0
    res = read_results(out)
    assert res["top1"] == read_results(runs["cache32"])["top1"]
    assert res["cache_prefix"] is False and res["lean"] is False  # evaluation runs the plain forward


@pytest.mark.parametrize("extra,needles", [
    (["--cache_prefix", "--drop_path", "0.1"], ["--cache_prefix_approx", "drop_path"]),
    (["--cache_prefix", "--mixup", "0.8"], ["--cache_prefix", "--mixup"]),
    (["--cache_prefix", "--cutmix", "1.0"], ["--cache_prefix", "--cutmix"]),
    (["--lean", "--method", "lora"], ["--lean", "--method lora"]),
    (["--cache_prefix", "--method", "linear"], ["--cache_prefix", "--method linear"]),
    (["--cache_prefix_approx"], ["--cache_prefix_approx", "only with --cache_prefix"]),
    (["--cache_storage", "mmap"], ["--cache_storage", "only with --cache_prefix"]),
    (["--cache_prefix", "--cache_dir", "/nonexistent/cache/dir"], ["--cache_dir", "not found"]),
])
def test_refusals(vtab, tmp_path, caplog, extra, needles):
    out = tmp_path / "run"
    argv = _argv(vtab, out, *extra)
    if "--method" in extra:
        argv.remove("--fusion_size")
        argv.remove("3")
    assert run_train(argv) == 2
    for needle in needles:
        assert needle in caplog.text, (needle, caplog.text)
    assert result_files(out) == []
    assert not os.path.exists(out / "summary.csv")  # refused before the run folder is set up


def test_approximate_cache_runs_and_says_so(vtab, tmp_path):
    out = tmp_path / "approx"
    assert run_train(_argv(vtab, out, "--cache_prefix", "--cache_prefix_approx", "--drop_path", "0.1",
                           "--epochs", "1", "--warmup_epochs", "0")) == 0
    res = read_results(out)
    assert res["cache_prefix"] is True and res["cache_approximate"] is True
    assert "APPROXIMATE" in open(out / "log.txt").read()


@pytest.mark.parametrize("extra,changed,message", [
    (["--cache_prefix", "--cache_dtype", "float32"], ["--cache_prefix"],
     "--cache_dtype: checkpoint 'float32' vs now 'float16'"),
    # drop-path in the tail blocks draws random numbers every step: the resumed random stream must be the same
    (["--cache_prefix", "--cache_prefix_approx", "--drop_path", "0.2", "--lean"],
     ["--cache_prefix", "--cache_prefix_approx", "--drop_path", "0.2"], "--lean: checkpoint True vs now False"),
], ids=["exact", "approx-droppath-lean"])
def test_resume_with_cache(vtab, tmp_path, caplog, extra, changed, message):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run_train(_argv(vtab, ref, *extra)) == 0
    with kill_after(0, 1), pytest.raises(Killed):
        run_train(_argv(vtab, cut, *extra))
    assert result_files(cut) == []
    # the lean/cache flags are part of the run's settings
    caplog.clear()
    assert run_train(_argv(vtab, cut, *changed, "--resume", cut / "last.pth")) == 2
    assert message in caplog.text
    assert run_train(_argv(vtab, cut, *extra, "--resume", cut / "last.pth")) == 0
    assert strip_timing(read_summary(cut)) == strip_timing(read_summary(ref))
    a, b = read_results(ref), read_results(cut)
    assert a["top1"] == b["top1"] and b["cache_prefix"] is True
    da, db = load_delta(ref / "delta.pth")["delta"], load_delta(cut / "delta.pth")["delta"]
    for k in da:
        assert torch.equal(da[k], db[k]), k
    assert open(cut / "log.txt").read().count("prefix cache ready") == 2  # rebuilt on resume


def test_cache_loader_draws_the_dataloaders_batches():
    """CacheBatchLoader (gather by index) == a DataLoader over cache.dataset() with the train sampler, and the
    images' own loader visits the same indices, epoch after epoch, on every rank."""
    from torch.utils.data import DataLoader, Dataset

    from engine.prefix_cache import PrefixCache
    from utils.distributed import DistInfo
    from utils.loader import build_cache_train_loader, build_train_loader, set_epoch

    n = 21
    feats = torch.randn(n, 3, 4)
    cache = PrefixCache({0: feats.clone(), 2: feats.clone() * 2}, torch.arange(n), [0, 2], 2, "host")

    class Indexed(Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return torch.tensor(i), i

    for world, rank in ((1, 0), (2, 1)):
        dist = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
        fast = build_cache_train_loader(cache, 4, dist, seed=7)
        images = build_train_loader(Indexed(), 4, dist, seed=7, num_workers=0)
        slow = build_train_loader(cache.dataset(), 4, dist, seed=7, num_workers=0)
        orders = []
        for epoch in range(3):
            for ld in (fast, images, slow):
                set_epoch(ld, epoch, 7, rank)
            got, via_images, ref = list(fast), list(images), list(slow)
            assert len(got) == len(ref) == len(via_images) == len(fast) > 0
            for (x, y), (xr, yr), (idx, _) in zip(got, ref, via_images):
                assert torch.equal(y, yr) and torch.equal(y, idx)
                assert sorted(x) == [0, 2] and all(torch.equal(x[k], xr[k]) for k in x)
                assert torch.equal(x[0], feats[idx])
            orders.append(torch.cat([y for _, y in got]))
        assert not torch.equal(orders[0], orders[1])  # reshuffled every epoch
