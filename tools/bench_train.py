#!/usr/bin/env python3
"""Time DTL training epochs in the default, lean and frozen-prefix-cache modes on a VTAB-1k root.

Each mode runs in its own subprocess (so that peak memory is per mode) with the same seed and data order, and
trains with train.py's own :class:`engine.trainer.Trainer` (AdamW with weight decay 0.05 except biases, the
cosine schedule without warm-up, cross-entropy, the gradient scaler under fp16) on the task's ``train800val200``
split, shuffled, last incomplete batch dropped.  Reported per mode:

- ``epoch_s``: mean seconds per training epoch *after the first* (the first epoch warms up allocators and
  caches; with ``--epochs 1`` it is the only epoch, and the table says so);
- ``cache_build_s``: for the cache modes, the one-off time to compute the prefix cache, which is **not** part
  of ``epoch_s``;
- ``peak_mib``: peak resident memory of the process (RSS, CPU) or ``torch.cuda.max_memory_allocated`` over
  the training epochs (GPU; the cache, when in GPU memory, is included);
- ``speedup``: ``epoch_s`` of ``default`` divided by the mode's;
- ``epoch_cpu_s`` / ``speedup_cpu``: the same with the process's CPU time (all threads), which other programs
  running on a shared machine disturb much less than wall-clock time.

Like ``train.py`` on a GPU: ``cudnn.benchmark`` on, ``--num_workers`` loader processes (default: train.py's 4
on CUDA, 0 on the CPU) with pinned memory, and the cache batches gathered inside the timed epoch into pinned
buffers (host storage) as train.py's cache loader does -- so that the default and lean modes are not made
input-bound by a slower loader than train.py's, which would inflate the cache's speed-up.

Modes: ``default`` (the original's computation), ``lean`` (models.lean), ``cache`` (engine.prefix_cache;
float16 storage), ``cache+lean`` (both).

Example (generates a 48-image VTAB root at 224 px into a temporary folder)::

    python tools/bench_train.py --model vit_base_patch16_224_in21k --make_synthetic 48 --dataset cifar_100 \\
        --modes default,cache --epochs 2 --batch_size 8 --json bench_train.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from data.benchmarks import get_benchmark  # noqa: E402
from data.synthetic import make_vtab_root  # noqa: E402
from data.transforms import build_transform  # noqa: E402
from data.vtab import build_vtab_dataset, get_vtab_task  # noqa: E402
from engine.prefix_cache import PrefixCache  # noqa: E402
from engine.spec import OptimSpec  # noqa: E402
from engine.trainer import Trainer, effective_precision  # noqa: E402
from models import DTLConfig, create_dtl_model  # noqa: E402
from utils.atomic import atomic_write_json  # noqa: E402
from utils.determinism import configure_backends  # noqa: E402
from utils.distributed import DistInfo  # noqa: E402
from utils.metrics import peak_rss_mib  # noqa: E402

MODES = ("default", "lean", "cache", "cache+lean")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224_in21k", help="backbone name (timm ViT; the original's names work)")
    p.add_argument("--load_path", default=None, help="backbone weights file (default: random weights; timing does not depend on them)")
    p.add_argument("--data_dir", default=None, help="VTAB-1k root (folder per task)")
    p.add_argument("--dataset", default="cifar_100", help="VTAB task (default cifar_100)")
    p.add_argument("--make_synthetic", type=int, default=0, metavar="N",
                   help="generate a VTAB root with N training images (train800val200) into a temp folder and use it")
    p.add_argument("--synthetic_img_size", type=int, default=224, help="side of the generated images (default 224)")
    p.add_argument("--modes", default="default,lean,cache", help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--img_size", type=int, default=224)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--amp", default="none", choices=("none", "fp16", "bf16"), help="autocast dtype (GPU: the launchers use fp16)")
    p.add_argument("--r", type=int, default=None, help="DTL rank (default: the backbone's, ViT 2, Swin 4)")
    p.add_argument("--fusion_size", type=int, default=0, help="DTL+ kernel (0 = DTL)")
    p.add_argument("--csn_blocks", default=None, help="taps, e.g. 0-11 (default: the backbone's)")
    p.add_argument("--add_back_blocks", default=None, help="add-back blocks, e.g. 6-11 (default: the backbone's)")
    p.add_argument("--drop_path", type=float, default=0.0,
                   help="stochastic depth; > 0 makes the cache modes approximate (they then need --cache_prefix_approx)")
    p.add_argument("--cache_prefix_approx", action="store_true", help="let the cache modes disable prefix drop-path")
    p.add_argument("--cache_storage", default="auto", choices=("auto", "device", "host", "mmap"))
    p.add_argument("--cache_dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num_workers", type=int, default=None,
                   help="data loader workers (default: 4 on CUDA, as train.py, 0 on the CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as a JSON list")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes: unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    args.mode_list = modes
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    if args.num_workers is not None and args.num_workers < 0:
        p.error("--num_workers must be >= 0")
    if not args.data_dir and not args.make_synthetic:
        p.error("give --data_dir ROOT (a VTAB-1k root) or --make_synthetic N")
    if args.data_dir and not os.path.isdir(args.data_dir):
        p.error(f"--data_dir {args.data_dir}: folder not found")
    return args


def recipe(args: argparse.Namespace) -> OptimSpec:
    """The recipe timed here: train.py's defaults (AdamW, weight decay 0.05 except biases) with this tool's
    learning rate, epochs (no warm-up), batch and autocast."""
    amp_dtype = "bfloat16" if args.amp == "bf16" else "float16"
    return OptimSpec(lr=args.lr, weight_decay=0.05, epochs=args.epochs, warmup_epochs=0, batch_size=args.batch_size,
                     amp=args.amp != "none", amp_dtype=amp_dtype)


def run_worker(args: argparse.Namespace, mode: str) -> Dict[str, Any]:
    """One mode in this process: build the model (and cache), train ``--epochs`` epochs with the Trainer of
    train.py, time them."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configure_backends(False, device)  # cudnn.benchmark on CUDA, as train.py
    cuda = device.type == "cuda"
    workers = args.num_workers if args.num_workers is not None else (4 if cuda else 0)
    task = get_vtab_task(args.dataset)
    dataset = build_vtab_dataset(args.data_dir, task, "train800val200",
                                 transform=build_transform("vtab", True, args.img_size))
    steps = len(dataset) // args.batch_size
    if steps == 0:
        raise SystemExit(f"--batch_size {args.batch_size} is larger than the {len(dataset)} training images")
    torch.manual_seed(args.seed)
    dtl = DTLConfig(r=args.r, fusion_size=args.fusion_size, csn_blocks=args.csn_blocks, add_back_blocks=args.add_back_blocks)
    model = create_dtl_model(args.model, task.num_classes, dtl, load_path=args.load_path, img_size=args.img_size,
                             drop_path_rate=args.drop_path, lean="lean" in mode)
    optim = recipe(args)
    trainer = Trainer(model, optim, effective_precision(optim.amp, optim.amp_dtype, device), DistInfo(device=device),
                      task.num_classes)

    cache, build_s = None, None
    if mode.startswith("cache"):
        cache = PrefixCache.build(
            trainer.model, dataset, batch_size=max(args.batch_size, 32), device=device, storage=args.cache_storage,
            dtype=getattr(torch, args.cache_dtype), deterministic=get_benchmark("vtab").train_transform_is_deterministic(),
            allow_approximate=args.cache_prefix_approx, num_workers=workers,
            autocast_dtype=trainer.autocast_dtype,
        )
        build_s = cache.build_seconds

    def batches(epoch: int):
        # The same shuffled batches in every mode (a seeded permutation per epoch, last partial batch dropped).
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed + epoch))
        index_batches = [order[i:i + args.batch_size].tolist() for i in range(0, steps * args.batch_size, args.batch_size)]
        if cache is not None:  # gathered lazily inside the epoch, as train.py's cache loader
            return (cache.gather(torch.tensor(idx), pin_memory=cuda) for idx in index_batches)
        return torch.utils.data.DataLoader(dataset, batch_sampler=index_batches, num_workers=workers, pin_memory=cuda)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times, losses = [], [], []
    for epoch in range(args.epochs):
        loader = batches(epoch)
        c0 = time.process_time()
        stats = trainer.train_one_epoch(loader, epoch)
        times.append(stats["seconds"])
        cpu_times.append(time.process_time() - c0)
        losses.append(stats["loss"])
        print(f"[{mode}] epoch {epoch + 1}/{args.epochs}: {times[-1]:.2f}s (CPU time {cpu_times[-1]:.2f}s, {steps} steps), "
              f"mean loss {losses[-1]:.4f}", flush=True)
    timed = times[1:] if len(times) > 1 else times
    cpu_timed = cpu_times[1:] if len(cpu_times) > 1 else cpu_times
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        peak, peak_kind = peak_rss_mib(), "rss"
    return {
        "mode": mode, "epoch_s": sum(timed) / len(timed), "peak_mib": peak, "speedup": None,
        "epoch_cpu_s": sum(cpu_timed) / len(cpu_timed), "speedup_cpu": None,
        "cache_build_s": build_s, "epoch_times_s": times, "first_epoch_excluded": len(times) > 1,
        "peak_kind": peak_kind, "steps_per_epoch": steps, "n_images": len(dataset), "final_loss": losses[-1],
        "cache_mib": cache.nbytes / 2**20 if cache is not None else None,
        "cache_storage": cache.storage if cache is not None else None, "num_workers": workers,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if cuda else None,
        "cache_approximate": cache.approximate if cache is not None else None,
    }


def format_table(rows: List[Dict[str, Any]], args: argparse.Namespace) -> str:
    peak_kind = rows[0]["peak_kind"] if rows else "rss"
    peak_name = "peak RSS MiB" if peak_kind == "rss" else "peak alloc MiB"
    lines = [
        f"model {args.model}, {args.dataset} train800val200 ({rows[0]['n_images']} images, "
        f"{rows[0]['steps_per_epoch']} steps/epoch), batch {args.batch_size}, {args.img_size} px, device {args.device}, "
        f"amp {args.amp}, r={args.r or 'backbone default'}, fusion={args.fusion_size}, drop_path={args.drop_path}, epochs {args.epochs}, "
        f"threads {args.threads or 'default'}",
        "epoch_s = mean seconds per epoch after the first" if args.epochs > 1 else
        "epoch_s = the single epoch (--epochs 1: includes warm-up)",
        "cache build = one-off prefix computation, NOT included in epoch_s",
        "epoch CPU s = process CPU time (all threads) per epoch, same epochs: less sensitive to other load on the machine",
        f"{'mode':<12} {'epoch_s':>9} {'speedup':>8} {'epoch CPU s':>12} {'CPU speedup':>12} {peak_name:>15} "
        f"{'cache build s':>14} {'cache MiB':>10}",
    ]
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        spc = f"{r['speedup_cpu']:.2f}x" if r["speedup_cpu"] is not None else "-"
        cb = f"{r['cache_build_s']:.2f}" if r["cache_build_s"] is not None else "-"
        cm = f"{r['cache_mib']:.1f}" if r["cache_mib"] is not None else "-"
        lines.append(f"{r['mode']:<12} {r['epoch_s']:>9.3f} {sp:>8} {r['epoch_cpu_s']:>12.3f} {spc:>12} "
                     f"{r['peak_mib']:>15.1f} {cb:>14} {cm:>10}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args._worker:
        result = run_worker(args, args._worker)
        atomic_write_json(args._result, result, indent=1)
        return 0
    tmp = None
    if args.make_synthetic:
        tmp = tempfile.TemporaryDirectory(prefix="dtl_bench_train_")
        n = args.make_synthetic
        n_val = n // 5
        print(f"generating a synthetic VTAB root ({n} images of {args.synthetic_img_size} px) in {tmp.name}", flush=True)
        args.data_dir = make_vtab_root(tmp.name, tasks=(args.dataset,), n_train=n - n_val, n_val=n_val, n_test=1,
                                       img_size=args.synthetic_img_size)
    rows = []
    try:
        for mode in args.mode_list:
            with tempfile.TemporaryDirectory(prefix="dtl_bench_mode_") as d:
                out = os.path.join(d, "result.json")
                cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                       "--data_dir", args.data_dir, "--make_synthetic", "0", "--_worker", mode, "--_result", out]
                res = subprocess.run(cmd, cwd=REPO)
                if res.returncode != 0:
                    print(f"mode {mode!r} failed (exit {res.returncode})", file=sys.stderr)
                    return res.returncode
                with open(out) as f:
                    rows.append(json.load(f))
    finally:
        if tmp is not None:
            tmp.cleanup()
    base = next((r["epoch_s"] for r in rows if r["mode"] == "default"), None)
    base_cpu = next((r["epoch_cpu_s"] for r in rows if r["mode"] == "default"), None)
    for r in rows:
        r["speedup"] = base / r["epoch_s"] if base else None
        r["speedup_cpu"] = base_cpu / r["epoch_cpu_s"] if base_cpu else None
        r.update(model=args.model, batch_size=args.batch_size, img_size=args.img_size, device=args.device, amp=args.amp,
                 epochs=args.epochs, dataset=args.dataset)
    print(format_table(rows, args))
    if args.json:
        atomic_write_json(args.json, rows, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
