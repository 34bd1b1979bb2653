#!/usr/bin/env python3
"""Training memory and speed of DTL against the baseline tuning methods, on the CPU or a CUDA GPU.

For one backbone, batch size, resolution and precision, each method trains a few steps on random data (weights
are random too: memory does not depend on their values) and we measure one training step after warm-up:

- ``saved_mib`` (any device): MiB of non-parameter tensors autograd saves for backward in one training
  forward (``model.train()``), from ``torch.autograd.graph.saved_tensors_hooks``, each storage counted once with
  its full size, parameter and buffer storages excluded (:class:`utils.memory.SavedTensorMeter`).  This is the
  number a tuning method controls, and the one the DTL paper's argument is about.
- CPU: ``peak_rss_mib`` = the process's peak resident memory (``VmHWM``) during the timed steps, with the peak
  reset just before them (``/proc/self/clear_refs``; where that is not allowed, the process's lifetime peak
  ``ru_maxrss`` is reported and the table says so).  Every method runs in a fresh subprocess (unless
  ``--in_process``), so methods do not inherit each other's allocator state, with glibc's mmap threshold fixed
  (``MALLOC_MMAP_THRESHOLD_``) so that freed activations go back to the OS; the table also shows the rise over
  the resident memory before the step (``rss_step``: activations, gradients and temporaries of one step).  ``step_s``: mean wall time of a training step
  (forward, backward, AdamW step).
- CUDA: ``peak_alloc_mib`` / ``peak_reserved_mib`` = ``torch.cuda.max_memory_allocated/reserved`` over the timed
  steps (reset before them); ``images_per_s`` over the timed steps. ``cudnn.benchmark`` is on, as in
  ``train.py``; with ``--in_process`` the CUDA caching allocator is emptied between methods, so that
  ``peak_reserved_mib`` is not inherited from the previous method.

Usage::

    python tools/bench_memory.py --batch_size 32 --device cpu --json bench.json
    python tools/bench_memory.py --device cuda --precision fp16 --methods full,lora,dtl,dtl+

``--precision fp16|bf16`` runs the forward under ``torch.autocast`` (fp16 on CUDA also with a gradient
scaler); saved-tensor MiB then include autocast's low-precision copies of weights (they are held for backward).
``--fused_attn off`` switches every timm attention module to the explicit softmax(QK^T)V path.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from methods import LEAN_SUFFIX, Method, featured_results_names, get_method, parse_label, results_names  # noqa: E402
from models import create_tuned_model, family_of_name  # noqa: E402
from models.trainable import count_parameters  # noqa: E402
from cli.flags import model_kwargs_type  # noqa: E402
from utils.atomic import atomic_write_json  # noqa: E402
from utils.errors import ModelSettingsError  # noqa: E402
from utils.memory import MIB, SavedTensorMeter  # noqa: E402
from utils.metrics import peak_rss_mib  # noqa: E402

def _labels() -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """The method labels: every results name of the method registry, the baselines first and the featured method
    (DTL, DTL+) last as in the paper's tables; and, not in the default list, ``<name>-lean`` for each with lean mode."""
    featured = featured_results_names()
    names = tuple(n for n in results_names() if n not in featured) + featured
    return names, tuple(n + LEAN_SUFFIX for n in names if get_method(n).supports("lean"))


ALL_METHODS, EXTRA_METHODS = _labels()
JSON_KEYS = ("method", "device", "batch_size", "img_size", "precision", "fused_attn", "saved_mib", "peak_alloc_mib",
             "peak_reserved_mib", "peak_rss_mib", "step_s", "images_per_s", "n_trainable")
_RESULT_MARK = "@@BENCH_RESULT@@ "


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", help="timm ViT/Swin name (default: %(default)s)")
    p.add_argument("--model_kwargs", default="", help="extra timm kwargs, e.g. 'embed_dim=64,depth=4,num_heads=2'")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--img_size", type=int, default=224)
    p.add_argument("--num_classes", type=int, default=100)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma-separated, from {', '.join(ALL_METHODS + EXTRA_METHODS)} (default: all but the lean ones)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="AMP dtype (fp32 = no autocast)")
    p.add_argument("--fused_attn", choices=("on", "off"), default="on", help="timm's fused attention (SDPA); default on, as timm")
    p.add_argument("--drop_path", type=float, default=0.0, help="stochastic depth rate of the backbone (default 0)")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps before measuring")
    p.add_argument("--steps", type=int, default=2, help="timed training steps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in_process", action="store_true",
                   help="run all methods in this process (faster; peak RSS then carries over between methods)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as a JSON list here (atomically)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def check_args(args: argparse.Namespace) -> List[str]:
    """Validate everything before any model is built; return the method list."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS + EXTRA_METHODS]
    if not methods or unknown:
        raise SystemExit(f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(ALL_METHODS + EXTRA_METHODS)}")
    if len(set(methods)) != len(methods):
        raise SystemExit(f"--methods lists a method twice: {args.methods}")
    for name in ("batch_size", "img_size", "num_classes", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.threads < 0:
        raise SystemExit("--warmup and --threads must be >= 0")
    try:
        args.model_kwargs_dict = model_kwargs_type(args.model_kwargs)
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"--model_kwargs: {e}") from None
    try:
        family = family_of_name(args.model)
    except ValueError as e:
        raise SystemExit(f"--model: {e}") from None
    for m in methods:  # built on the meta device: the model code's own checks (a baseline the family lacks, ...)
        try:
            with torch.device("meta"):
                build_model(m, args)
        except ModelSettingsError as e:
            raise SystemExit(f"--methods {m}: {e}; drop it for a {family.title} --model") from None
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(d):
            raise SystemExit(f"--json: directory {d} does not exist")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
    return methods


# ----------------------------------------------------------------------------------------------------------------
# One method (runs in a worker process unless --in_process)
# ----------------------------------------------------------------------------------------------------------------
def method_of_label(label: str, model: str) -> Tuple[Method, Mapping[str, Any], bool]:
    """The registered method of a label, its configuration (dict form) and lean mode. DTL's labels are its
    results names: ``dtl`` (no fusion) and ``dtl+`` (the family's DTL+ kernel: ViT k=3, Swin k=5)."""
    method, name, lean = parse_label(label)
    config: Mapping[str, Any] = {}
    if method.supports("uses_dtl_flags"):
        choices = ({"fusion_size": 0}, {"fusion_size": family_of_name(model).plus_fusion_size})
        config = next(c for c in choices if method.results_name(c) == name)
    return method, config, lean


def build_model(label: str, args: argparse.Namespace):
    kw = dict(args.model_kwargs_dict)
    kw.setdefault("img_size", args.img_size)
    if args.drop_path:
        kw["drop_path_rate"] = args.drop_path
    method, config, lean = method_of_label(label, args.model)
    return create_tuned_model(method.name, args.model, args.num_classes, settings=dict(config), lean=lean, **kw)


def _read_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_method(method: str, args: argparse.Namespace) -> Dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.py
    model = build_model(method, args)
    fused = args.fused_attn == "on"
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = count_parameters(model).trainable
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05) if params else None
    amp_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    scaler = torch.amp.GradScaler("cuda") if (amp_dtype == torch.float16 and device.type == "cuda") else None
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    def forward_loss() -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(x)
        return F.cross_entropy(out.float(), y)

    def finish(loss: torch.Tensor) -> None:
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if opt is not None:
                opt.step()
        if opt is not None:
            opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        finish(forward_loss())
    # one instrumented step: what autograd keeps for backward
    with SavedTensorMeter(model) as meter:
        loss = forward_loss()
    saved_mib = meter.nbytes / MIB
    finish(loss)
    del loss
    sync()

    rss_reset = rss_before_kib = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        rss_reset = _reset_peak_rss()
        rss_before_kib = _read_status_kib("VmRSS")
    t0 = time.perf_counter()
    for _ in range(args.steps):
        finish(forward_loss())
    sync()
    step_s = (time.perf_counter() - t0) / args.steps
    res: Dict[str, Any] = {k: None for k in JSON_KEYS}
    res.update(method=method, device=args.device, batch_size=args.batch_size, img_size=args.img_size,
               precision=args.precision, fused_attn=fused, saved_mib=round(saved_mib, 2), step_s=round(step_s, 4),
               images_per_s=round(args.batch_size / step_s, 2), n_trainable=n_trainable)
    extra: Dict[str, Any] = {}
    if device.type == "cuda":
        res["peak_alloc_mib"] = round(torch.cuda.max_memory_allocated(device) / MIB, 1)
        res["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / MIB, 1)
    else:
        hwm = _read_status_kib("VmHWM") if rss_reset else None
        if hwm is not None:
            res["peak_rss_mib"] = round(hwm / 1024.0, 1)
            extra["rss_step_mib"] = round((hwm - (rss_before_kib or hwm)) / 1024.0, 1)
            extra["rss_kind"] = "step"
        else:  # no /proc or not allowed: lifetime peak of the process
            res["peak_rss_mib"] = round(peak_rss_mib(), 1)
            extra["rss_kind"] = "lifetime"
    res["_extra"] = extra
    return res


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
def release_memory(device: str) -> None:
    """Between in-process methods: collect the previous method's objects and give its cached CUDA blocks back,
    so that the next method starts from an empty allocator (peak reserved memory is per method)."""
    gc.collect()
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()



def _worker_argv(method: str, argv: List[str]) -> List[str]:
    return [sys.executable, os.path.abspath(__file__), *argv, "--worker", method]


def worker_env() -> Dict[str, str]:
    """The worker's environment: glibc malloc with a *fixed* mmap threshold (its default, 128 KiB), so that
    activation-sized buffers are mmap-ed and returned to the OS when freed; otherwise glibc raises the threshold
    after the first free and keeps freed activations in the heap, and the RSS before a step already holds the
    previous step's peak."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    return env


def run_in_subprocess(method: str, argv: List[str]) -> Dict[str, Any]:
    proc = subprocess.run(_worker_argv(method, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=worker_env())
    lines = [l for l in proc.stdout.splitlines() if l.startswith(_RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench_memory: method {method!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(_RESULT_MARK):])


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def settings_lines(args: argparse.Namespace, methods: List[str]) -> List[str]:
    if args.device == "cuda":
        dev = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        dev = f"cpu ({platform.processor() or platform.machine()}, {args.threads or torch.get_num_threads()} threads)"
    return [
        f"model {args.model}{' ' + args.model_kwargs if args.model_kwargs else ''} | img {args.img_size} | "
        f"batch {args.batch_size} | classes {args.num_classes} | device {dev}",
        f"precision {args.precision} | fused attention {args.fused_attn} | drop_path {args.drop_path} | "
        f"warmup {args.warmup} + timed steps {args.steps} | optimiser AdamW | "
        f"{'one process' if args.in_process else 'fresh process per method'} | torch {torch.__version__} | timm {timm.__version__}",
        "saved = MiB of non-parameter tensors saved for backward in one training forward (each storage once)",
    ]


def format_table(results: List[Dict[str, Any]], args: argparse.Namespace, methods: List[str]) -> str:
    lines = settings_lines(args, methods)
    if args.device == "cuda":
        head = f"{'method':<12} {'trainable':>11} {'saved MiB':>10} {'peak alloc':>11} {'reserved':>10} {'step s':>8} {'img/s':>8}"
        rows = [f"{r['method']:<12} {r['n_trainable']:>11,} {_fmt(r['saved_mib']):>10} {_fmt(r['peak_alloc_mib']):>11} "
                f"{_fmt(r['peak_reserved_mib']):>10} {_fmt(r['step_s'], '.3f'):>8} {_fmt(r['images_per_s']):>8}"
                for r in results]
    else:
        kinds = {r.get("_extra", {}).get("rss_kind") for r in results}
        if "lifetime" in kinds:
            lines.append("peak RSS = lifetime peak of the process (the peak could not be reset before the step)")
        else:
            lines.append("peak RSS = process peak during the timed steps; rss_step = its rise over the RSS before them")
        head = f"{'method':<12} {'trainable':>11} {'saved MiB':>10} {'peak RSS':>9} {'rss_step':>9} {'step s':>8} {'img/s':>7}"
        rows = [f"{r['method']:<12} {r['n_trainable']:>11,} {_fmt(r['saved_mib']):>10} {_fmt(r['peak_rss_mib']):>9} "
                f"{_fmt(r.get('_extra', {}).get('rss_step_mib')):>9} {_fmt(r['step_s'], '.3f'):>8} {_fmt(r['images_per_s'], '.2f'):>7}"
                for r in results]
    return "\n".join(lines + [head, "-" * len(head)] + rows)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.worker:
        args.model_kwargs_dict = model_kwargs_type(args.model_kwargs)
        res = run_method(args.worker, args)
        print(_RESULT_MARK + json.dumps(res), flush=True)
        return [res]
    methods = check_args(args)
    results = []
    for m in methods:
        print(f"[bench_memory] {m} ...", file=sys.stderr, flush=True)
        results.append(run_method(m, args) if args.in_process else run_in_subprocess(m, argv))
        if args.in_process:
            release_memory(args.device)
    print(format_table(results, args, methods))
    if args.json:
        atomic_write_json(args.json, [{k: r[k] for k in JSON_KEYS} for r in results], indent=1)
    return results


if __name__ == "__main__":
    main()
