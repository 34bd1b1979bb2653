#!/usr/bin/env python3
"""Time DTL training epochs in the default, lean and frozen-prefix-cache modes on a VTAB-1k root.

Each mode runs in its own subprocess (so that peak memory is per mode) with the same seed, data order and
recipe pieces (AdamW with weight decay 0.05 except biases, cross-entropy; SPEC §2), on the task's
``train800val200`` split, shuffled, last incomplete batch dropped.  Reported per mode:

- ``epoch_s``: mean seconds per training epoch *after the first* (the first epoch warms up allocators and
  caches; with ``--epochs 1`` it is the only epoch, and the table says so);
- ``cache_build_s``: for the cache modes, the one-off time to compute the prefix cache, which is **not** part
  of ``epoch_s``;
- ``peak_mib``: peak resident memory of the process (RSS, CPU) or ``torch.cuda.max_memory_allocated`` over
  the training epochs (GPU; the cache, when in GPU memory, is included);
- ``speedup``: ``epoch_s`` of ``default`` divided by the mode's;
- ``epoch_cpu_s`` / ``speedup_cpu``: the same with the process's CPU time (all threads), which other programs
  running on a shared machine disturb much less than wall-clock time.

Modes: ``default`` (the original's computation), ``lean`` (models.lean), ``cache`` (models.prefix_cache;
float16 storage), ``cache+lean`` (both).

Example (generates a 48-image VTAB root at 224 px into a temporary folder)::

    python tools/bench_train.py --model vit_base_patch16_224_in21k --make_synthetic 48 --dataset cifar_100 \\
        --modes default,cache --epochs 2 --batch_size 8 --json bench_train.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

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
    p.add_argument("--num_workers", type=int, default=0, help="data loader workers (default 0)")
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
    if not args.data_dir and not args.make_synthetic:
        p.error("give --data_dir ROOT (a VTAB-1k root) or --make_synthetic N")
    if args.data_dir and not os.path.isdir(args.data_dir):
        p.error(f"--data_dir {args.data_dir}: folder not found")
    return args


def _peak_rss_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def run_worker(args: argparse.Namespace, mode: str) -> Dict[str, Any]:
    """One mode in this process: build the model (and cache), train ``--epochs`` epochs, time them."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from data.transforms import build_transform, transform_is_deterministic
    from data.vtab import build_vtab_dataset, get_vtab_task
    from models import DTLConfig, create_dtl_model
    from models.prefix_cache import PrefixCache

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = get_vtab_task(args.dataset)
    dataset = build_vtab_dataset(args.data_dir, task, "train800val200",
                                 transform=build_transform("vtab", True, args.img_size))
    steps = len(dataset) // args.batch_size
    if steps == 0:
        raise SystemExit(f"--batch_size {args.batch_size} is larger than the {len(dataset)} training images")
    torch.manual_seed(args.seed)
    dtl = DTLConfig(r=args.r, fusion_size=args.fusion_size, csn_blocks=args.csn_blocks, add_back_blocks=args.add_back_blocks)
    model = create_dtl_model(args.model, task.num_classes, dtl, load_path=args.load_path, img_size=args.img_size,
                             drop_path_rate=args.drop_path, lean="lean" in mode).to(device)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    amp_dtype = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    cache, build_s = None, None
    if mode.startswith("cache"):
        cache = PrefixCache.build(
            model, dataset, batch_size=max(args.batch_size, 32), device=device, storage=args.cache_storage,
            dtype=getattr(torch, args.cache_dtype), deterministic=transform_is_deterministic("vtab", True),
            allow_approximate=args.cache_prefix_approx, num_workers=args.num_workers, autocast_dtype=amp_dtype,
        )
        build_s = cache.build_seconds

    def batches(epoch: int):
        # The same shuffled batches in every mode (a seeded permutation per epoch, last partial batch dropped).
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed + epoch))
        index_batches = [order[i:i + args.batch_size].tolist() for i in range(0, steps * args.batch_size, args.batch_size)]
        if cache is not None:
            for idx in index_batches:
                yield cache.gather(torch.tensor(idx), device)
        else:
            loader = DataLoader(dataset, batch_sampler=index_batches, num_workers=args.num_workers)
            for images, target in loader:
                yield images.to(device, non_blocking=True), target.to(device, non_blocking=True)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    times, cpu_times, losses = [], [], []
    for epoch in range(args.epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        for inputs, target in batches(epoch):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = model.forward_from_prefix(inputs) if cache is not None else model(inputs)
                loss = F.cross_entropy(out, target)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        print(f"[{mode}] epoch {epoch + 1}/{args.epochs}: {times[-1]:.2f}s (CPU time {cpu_times[-1]:.2f}s, {steps} steps), "
              f"last loss {losses[-1]:.4f}", flush=True)
    timed = times[1:] if len(times) > 1 else times
    cpu_timed = cpu_times[1:] if len(cpu_times) > 1 else cpu_times
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        peak, peak_kind = _peak_rss_mib(), "rss"
    return {
        "mode": mode, "epoch_s": sum(timed) / len(timed), "peak_mib": peak, "speedup": None,
        "epoch_cpu_s": sum(cpu_timed) / len(cpu_timed), "speedup_cpu": None,
        "cache_build_s": build_s, "epoch_times_s": times, "first_epoch_excluded": len(times) > 1,
        "peak_kind": peak_kind, "steps_per_epoch": steps, "n_images": len(dataset), "final_loss": losses[-1],
        "cache_mib": cache.nbytes / 2**20 if cache is not None else None,
        "cache_storage": cache.storage if cache is not None else None,
        "cache_approximate": cache.approximate if cache is not None else None,
    }


def write_json_atomic(path: str, obj: Any) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600; give the file the usual permissions
    os.replace(tmp, path)


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
        write_json_atomic(args._result, result)
        return 0
    tmp = None
    if args.make_synthetic:
        from data.synthetic import make_vtab_root

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
        write_json_atomic(args.json, rows)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
