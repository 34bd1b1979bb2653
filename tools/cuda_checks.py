#!/usr/bin/env python3
"""Checks of the CUDA-only code paths (issue 15), run by tools/gpu_check.sh; each prints PASS/FAIL/SKIP.

    python tools/cuda_checks.py [--device cuda] [--data_dir VTAB_ROOT] [--json OUT.json]

* ``normaliser``: :class:`data.transforms.Uint8Normalizer` on the device equals the CPU ``ToTensor + Normalize``
  bitwise (every pixel value, and a random image); also reports whether ``x.div(255)`` with a Python number
  differs on this device (CUDA multiplies by the reciprocal).
* ``prefetcher`` (CUDA): :class:`utils.loader.CudaPrefetcher` over a pinned uint8 loader yields the CPU path's
  batches bitwise.
* ``peaks`` (CUDA): :class:`utils.metrics.PeakMemory` on the real counters: a 64 MiB temporary inside ``train``
  and a 128 MiB one inside ``eval`` are told apart.
* ``host_cache``: ``--cache_storage host`` keeps the cache unpinned and gathers pinned batches (CUDA) equal to
  the unpinned gather; the cache loader passes the pinning on.
* ``scaler`` (CUDA): an enabled fp16 GradScaler resumed from a scaler-less state starts fresh (no traceback).
* ``devices`` (CUDA): ``resolve_device("cuda:0", LOCAL_RANK)`` gives every local rank its own GPU; past the
  last GPU it is a usage error.
* ``deterministic_resume`` (with ``--data_dir``; meant for CUDA, runs anywhere): a tiny ``--deterministic`` run killed after epoch 1 and
  resumed ends bitwise like the uninterrupted one (losses and delta).

On the CPU the CUDA-only checks are skipped; the exit status is 1 when a check failed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import traceback
from typing import Callable, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

MIB = 1 << 20


class Skip(Exception):
    pass


def _need_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise Skip("needs CUDA")


def check_normaliser(device: torch.device) -> Dict:
    from torchvision import transforms as T

    from data.transforms import DTL_MEAN, DTL_STD, Uint8Normalizer

    every = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous()
    exact = every.float() / 255  # ToTensor on the CPU
    got = Uint8Normalizer((0.0,) * 3, (1.0,) * 3, device)(every.to(device)).cpu()
    scalar = every.to(device).float().div(255).cpu()
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 40, 3), dtype=np.uint8))
    ref = T.Compose([T.ToTensor(), T.Normalize(mean=torch.tensor(DTL_MEAN), std=torch.tensor(DTL_STD))])(img)
    full = Uint8Normalizer(DTL_MEAN, DTL_STD, device)(T.PILToTensor()(img).unsqueeze(0).to(device))[0].cpu()
    ok = torch.equal(got, exact) and torch.equal(full, ref)
    return {"ok": ok, "scalar_division_values_off": int((scalar != exact).sum().item())}


def check_prefetcher(device: torch.device) -> Dict:
    _need_cuda(device)
    from torch.utils.data import DataLoader, TensorDataset

    from data.transforms import DTL_MEAN, DTL_STD, Uint8Normalizer, normalize_uint8_batch
    from utils.loader import CudaPrefetcher

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.arange(20)
    loader = DataLoader(TensorDataset(x, y), batch_size=6, pin_memory=True)
    got = list(CudaPrefetcher(loader, device, Uint8Normalizer(DTL_MEAN, DTL_STD, device)))
    torch.cuda.synchronize(device)
    ok = len(got) == 4
    for (gx, gy), (cx, cy) in zip(got, loader):
        ok &= torch.equal(gx.cpu(), normalize_uint8_batch(cx, DTL_MEAN, DTL_STD)) and torch.equal(gy.cpu(), cy)
    return {"ok": bool(ok), "batches": len(got)}


def check_peaks(device: torch.device) -> Dict:
    _need_cuda(device)
    from utils.metrics import PeakMemory

    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    peaks = PeakMemory(device)
    with peaks.phase("train"):
        t = torch.empty(64 * MIB, dtype=torch.uint8, device=device)
        del t
    with peaks.phase("eval"):
        t = torch.empty(128 * MIB, dtype=torch.uint8, device=device)
        del t
    peaks.finish()
    mib = peaks.mib()
    b = base / MIB
    ok = abs(mib["train"] - b - 64) < 2 and abs(mib["eval"] - b - 128) < 2 and mib["run"] >= mib["eval"]
    return {"ok": bool(ok), "base_mib": round(b, 1), **{k: v for k, v in mib.items()}}


def _tiny_model_and_data():
    from models import DTLConfig, create_dtl_model

    torch.manual_seed(0)
    model = create_dtl_model("vit_tiny_patch16_224", 5, DTLConfig(), img_size=32, embed_dim=32, depth=4,
                             num_heads=2)
    ds = torch.utils.data.TensorDataset(torch.randn(10, 3, 32, 32), torch.arange(10) % 5)
    return model, ds


def check_host_cache(device: torch.device) -> Dict:
    from engine.prefix_cache import PrefixCache
    from utils.distributed import DistInfo
    from utils.loader import build_cache_train_loader

    model, ds = _tiny_model_and_data()
    model.to(device)
    cache = PrefixCache.build(model, ds, batch_size=4, device=device, storage="host", deterministic=True, log=None)
    dev = PrefixCache.build(model, ds, batch_size=4, device=device, storage="device", deterministic=True, log=None)
    cuda = device.type == "cuda"
    stored_pinned = any(t.is_pinned() for t in cache.tensors.values()) if cuda else False
    idx = torch.tensor([7, 2, 5])
    x0, y0 = cache.gather(idx)
    x1, y1 = cache.gather(idx, pin_memory=cuda)
    xd, yd = dev.gather(idx, pin_memory=cuda)
    pinned = all(v.is_pinned() for v in x1.values()) and y1.is_pinned() if cuda else None
    same = all(torch.equal(x0[k], x1[k]) and torch.equal(x0[k], xd[k].cpu()) for k in x0)
    same = same and torch.equal(y0, y1) and torch.equal(y0, yd.cpu())
    batches = list(build_cache_train_loader(cache, 4, DistInfo(device=device), seed=0, pin_memory=cuda))
    loader_pinned = all(v.is_pinned() for b in batches for v in b[0].values()) if cuda else None
    ok = cache.storage == "host" and not stored_pinned and same and pinned in (True, None) and \
        loader_pinned in (True, None)
    return {"ok": bool(ok), "stored_pinned": stored_pinned, "batch_pinned": pinned, "loader_pinned": loader_pinned,
            "equal": bool(same)}


def check_scaler(device: torch.device) -> Dict:
    _need_cuda(device)
    from engine.spec import OptimSpec
    from engine.trainer import Trainer
    from utils.distributed import DistInfo

    trainer = Trainer(torch.nn.Linear(4, 2), OptimSpec(amp=True), "fp16", DistInfo(device=device), 2)
    records: List[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("train").addHandler(handler)
    try:
        trainer.load_state_dict({**trainer.state_dict(), "scaler": {}}, "fp32-run/last.pth")
    finally:
        logging.getLogger("train").removeHandler(handler)
    warned = any("starts fresh" in r.getMessage() for r in records)
    return {"ok": bool(warned and trainer.scaler.is_enabled()), "scale": trainer.scaler.get_scale()}


def check_devices(device: torch.device) -> Dict:
    _need_cuda(device)
    from utils.errors import UsageError
    from utils.distributed import resolve_device

    n = torch.cuda.device_count()
    got = [resolve_device("cuda:0", lr).index for lr in range(n)]
    try:
        resolve_device("cuda:0", n)
        refused = False
    except UsageError:
        refused = True
    torch.cuda.set_device(device)
    return {"ok": got == list(range(n)) and refused, "gpus": n, "local_rank_to_gpu": got}


def check_deterministic_resume(device: torch.device, data_dir: str) -> Dict:
    if not data_dir:
        raise Skip("needs --data_dir")
    import csv

    import train
    from engine.run_folder import RunFolder

    class Killed(BaseException):
        pass

    def argv(out, *extra):
        return ["--data_dir", data_dir, "--dataset", "eurosat", "--model", "vit_tiny_patch16_224", "--img_size", "64",
                "--num_workers", "2", "--batch_size", "8", "--batch_size_test", "32", "--epochs", "2",
                "--warmup_epochs", "1", "--lr", "1e-3", "--amp", "--prefetcher", "--deterministic",
                "--device", str(device), "--output_dir", out, "--load_path", "", *extra]

    def losses(out):
        with open(os.path.join(out, "summary.csv"), newline="") as f:
            return [(r["epoch"], r["train_loss"]) for r in csv.DictReader(f)]

    with tempfile.TemporaryDirectory(prefix="dtl_det_") as d:
        ref, cut = os.path.join(d, "ref"), os.path.join(d, "cut")
        if train.main(argv(ref)) != 0:
            return {"ok": False, "error": "the reference run failed"}
        orig = RunFolder.save_resume

        def patched(self, state):
            orig(self, state)
            if state.trainer is not None and state.epoch == 1:
                raise Killed()

        RunFolder.save_resume = patched
        try:
            train.main(argv(cut))
        except Killed:
            pass
        finally:
            RunFolder.save_resume = orig
        if train.main(argv(cut, "--resume", os.path.join(cut, "last.pth"))) != 0:
            return {"ok": False, "error": "the resumed run failed"}
        a = torch.load(os.path.join(ref, "delta.pth"), map_location="cpu", weights_only=True)["delta"]
        b = torch.load(os.path.join(cut, "delta.pth"), map_location="cpu", weights_only=True)["delta"]
        same_delta = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        same_loss = losses(ref) == losses(cut)
    return {"ok": bool(same_delta and same_loss), "losses_equal": same_loss, "delta_equal": bool(same_delta)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data_dir", default="", help="a VTAB root with eurosat (for deterministic_resume)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    checks: Dict[str, Callable[[], Dict]] = {
        "normaliser": lambda: check_normaliser(device),
        "prefetcher": lambda: check_prefetcher(device),
        "peaks": lambda: check_peaks(device),
        "host_cache": lambda: check_host_cache(device),
        "scaler": lambda: check_scaler(device),
        "devices": lambda: check_devices(device),
        "deterministic_resume": lambda: check_deterministic_resume(device, args.data_dir),
    }
    rows, failed = [], 0
    for name, fn in checks.items():
        try:
            row = {"check": name, **fn()}
            row["status"] = "PASS" if row["ok"] else "FAIL"
        except Skip as e:
            row = {"check": name, "status": "SKIP", "ok": None, "why": str(e)}
        except Exception as e:  # noqa: BLE001 - report every check
            row = {"check": name, "status": "FAIL", "ok": False, "error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        failed += row["status"] == "FAIL"
        rows.append(row)
        print(row["status"], json.dumps(row, default=str), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
