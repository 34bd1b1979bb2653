#!/usr/bin/env python3
"""Multi-task inference: one frozen ViT/Swin backbone, several DTL deltas, one pass through the shared prefix.

DTL leaves the backbone untouched; a task is only its side network and head. The blocks no task changes run once
per image and each task continues with its own tail (:mod:`models.shared_prefix`); the predictions are those of
each task's model run alone (``--compare`` measures both ways and checks it).

Deltas (``--deltas``; :func:`models.delta.read_delta`), each one of: a delta folder (``config.json`` +
``delta.safetensors``), a ``delta.pth`` written by ``train.py``, or a plain dict ``{name: tensor}`` of the
trainable tensors (``delta_state_dict``; rank, taps, fusion size and class count come from the tensors, the rest
from ``--model``, ``--img_size``, ``--add_back_blocks`` and ``--beta``). All deltas must be DTL/DTL+ on the same
backbone (name, image size, timm arguments). Each delta's checksum is verified, and a delta recording other
backbone weights than ``--load_path``'s is refused (``--allow_backbone_mismatch`` uses it anyway, with a note);
non-finite tensors or logits are an error (exit status 2 or 1, nothing written).

Images (``--images``): files, folders (recursively) and list files (``.txt``, ``.csv``, ``.lst``: one image per
line, ``path label`` or ``path,label``, the label optional, a header line optional; relative paths from the
list's folder). Output (``--output``, ``.csv`` or ``.json``; default CSV on stdout): per image and task the
``--topk`` classes (index, name when the delta records class names) and their softmax probabilities.

Example::

    python tools/predict.py --load_path ViT-B_16.npz --deltas runs/cifar/delta.pth runs/dtd/delta \\
        --images my_images/ --output predictions.csv --topk 3 --compare
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from data.folder import list_rows  # noqa: E402
from data.listfile import to_rgb  # noqa: E402
from data.transforms import build_transform  # noqa: E402
from models.delta import DeltaCheckpoint, plain_dtl_spec, read_delta  # noqa: E402
from models.shared_prefix import SharedPrefixDTL, shared_model_from_deltas  # noqa: E402
from utils.atomic import WriteError, atomic_write_text  # noqa: E402
from utils.errors import USER_ERROR_TYPES, DataError, UsageError  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
LIST_EXTENSIONS = (".txt", ".csv", ".lst")


def resolve_device(name: str) -> torch.device:
    """``--device``: a device torch knows and this machine has (:class:`UsageError` otherwise)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {name}: not a device name ({e}); use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def read_task_deltas(args: argparse.Namespace) -> List[DeltaCheckpoint]:
    """Every ``--deltas`` entry; a plain tensor dict gets its spec from the flags."""
    out = []
    for path in args.deltas:
        d = read_delta(path)
        if d.spec is None:
            if d.layout != "model":
                raise UsageError(f"{path}: a state dict in the original code's key layout; convert it through "
                                 f"train.py --initial_checkpoint, or give a delta written by train.py")
            missing = [f for f, v in (("--model", args.model), ("--add_back_blocks", args.add_back_blocks)) if not v]
            if missing:
                raise UsageError(f"{path} is a plain tensor dict without its model configuration: give "
                                 f"{' and '.join(missing)} (e.g. --add_back_blocks 6-11) so the model can be rebuilt")
            d = plain_dtl_spec(d, args.model, args.add_back_blocks, args.beta, img_size=args.img_size or 224)
        else:
            given = [f"{flag} {v}" for flag, v, own in (("--model", args.model, d.spec.backbone),
                                                        ("--img_size", args.img_size, d.spec.img_size))
                     if v is not None and v != own]
            if given:
                raise UsageError(f"{path} records its model ({d.spec.backbone}, {d.spec.img_size} px); "
                                 f"{', '.join(given)} would rebuild another one")
        out.append(d)
    return out


def _list_paths(item: str) -> List[str]:
    """The image paths of a list file, read as training reads lists (:func:`data.folder.list_rows`: ``path label``
    or ``path,label``, a header line skipped) but with the label optional; relative paths from the list's folder."""
    base = os.path.dirname(os.path.abspath(item))
    out = []
    for path, _, n in list_rows(base, item, {}, labels_required=False):
        full = os.path.join(base, path)
        if not os.path.isfile(full):
            raise DataError(f"{full}: image not found (listed at {item}:{n})")
        out.append(full)
    return out


def collect_images(items: Sequence[str]) -> List[str]:
    """Image files from files, folders (recursively, sorted) and list files (see the module docstring)."""
    out: List[str] = []
    for item in items:
        if os.path.isdir(item):
            found = []
            for root, _, files in os.walk(item):
                found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                raise DataError(f"{item}: no image files in this folder")
            out += sorted(found)
        elif item.lower().endswith(LIST_EXTENSIONS):
            if not os.path.isfile(item):
                raise DataError(f"{item}: image list not found")
            out += _list_paths(item)
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise DataError(f"{item}: no such image, folder or list")
    if not out:
        raise DataError("no images given")
    return out


def load_images(paths: Sequence[str], img_size: int, benchmark: str, mean=None, std=None) -> torch.Tensor:
    """The evaluation transform of ``benchmark`` (data.transforms; the delta's normalisation) on every image."""
    norm = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
    tf = build_transform(benchmark, False, img_size, **norm)
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(tf(to_rgb(im, p)))  # 16-bit images scaled to 8 bits as in training
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{p}: unreadable image ({type(e).__name__}: {e})") from None
    return torch.stack(out)


def run_all(fn, images: torch.Tensor, batch_size: int, device: torch.device) -> Tuple[List[torch.Tensor], float]:
    """Logits per task over all images, and the seconds it took (images already decoded)."""
    parts: List[List[torch.Tensor]] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(0, images.shape[0], batch_size):
        parts.append([o.float().cpu() for o in fn(images[i:i + batch_size].to(device, non_blocking=True))])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))], dt


def unique_names(names: Sequence[str]) -> List[str]:
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def format_output(fmt: str, image_paths: Sequence[str], names: Sequence[str], logits: Sequence[torch.Tensor],
                  deltas: Sequence[DeltaCheckpoint], topk: int = 1) -> str:
    """Predictions as ``'csv'`` (one row per image; per task ``<task>_class``, ``<task>_name`` when the delta has
    class names, ``<task>_prob``, or with ``topk`` > 1 the same per rank as ``<task>_top<j>_...``) or ``'json'``
    (per image and task ``class``, ``prob``, ``name`` and the ``topk`` list)."""
    tops = [l.softmax(-1).topk(min(topk, l.shape[1]), dim=-1) for l in logits]
    classes = [d.class_names for d in deltas]

    def entries(t: int, i: int):
        p, c = tops[t]
        return [{"class": int(c[i, j]), **({"name": classes[t][int(c[i, j])]} if classes[t] else {}),
                 "prob": float(p[i, j])} for j in range(c.shape[1])]

    if fmt == "json":
        obj = {
            "tasks": [{"name": n, "delta": d.source, "num_classes": int(l.shape[1]),
                       "class_names": list(d.class_names) if d.class_names else None}
                      for n, d, l in zip(names, deltas, logits)],
            "predictions": [{"image": img, **{n: {**entries(t, i)[0], "topk": entries(t, i)} for t, n in
                                              enumerate(names)}} for i, img in enumerate(image_paths)],
        }
        return json.dumps(obj, indent=1) + "\n"
    header = ["image"]
    for t, n in enumerate(names):
        for j in range(tops[t][1].shape[1]):
            stem = n if topk == 1 else f"{n}_top{j + 1}"
            header += [f"{stem}_class", *([f"{stem}_name"] if classes[t] else []), f"{stem}_prob"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for i, img in enumerate(image_paths):
        row = [img]
        for t in range(len(names)):
            for e in entries(t, i):
                row += [e["class"], *([e["name"]] if "name" in e else []), f"{e['prob']:.6f}"]
        w.writerow(row)
    return buf.getvalue()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load_path", required=True,
                   help="backbone weights (.npz/.pth/.safetensors), 'timm' (timm's published weights) or '' (random "
                        "initialisation), as for train.py")
    p.add_argument("--deltas", nargs="+", required=True, help="delta checkpoints or delta folders, one per task")
    p.add_argument("--images", nargs="+", required=True, help="image files, folders or list files (.txt/.csv/.lst)")
    p.add_argument("--output", default=None, help="predictions file (.csv or .json; default: CSV on stdout)")
    p.add_argument("--topk", type=int, default=1, help="classes per image and task (default 1)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--benchmark", default="vtab", help="whose evaluation transform to use (vtab, few_shot, domain_generalization)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index>")
    p.add_argument("--model", default=None, help="plain tensor-dict deltas: their backbone name")
    p.add_argument("--img_size", type=int, default=None, help="plain tensor-dict deltas: their image size (224)")
    p.add_argument("--add_back_blocks", default=None, help="plain tensor-dict deltas: their add-back blocks")
    p.add_argument("--beta", type=float, default=100.0, help="plain tensor-dict deltas: their swish beta")
    p.add_argument("--allow_backbone_mismatch", action="store_true",
                   help="use deltas with backbone weights other than the ones they were trained on (otherwise "
                        "refused; the mismatch is reported)")
    p.add_argument("--compare", action="store_true",
                   help="also run the tasks one after another: report images/s of both and check identical predictions")
    p.add_argument("--repeats", type=int, default=3, help="--compare: timed runs of each way (the best counts)")
    args = p.parse_args(argv)
    for flag in ("batch_size", "repeats", "topk"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    return args


def note(msg: str) -> None:
    print(msg, file=sys.stderr)


def compare(shared: SharedPrefixDTL, images: torch.Tensor, args: argparse.Namespace, device: torch.device) -> bool:
    """``--compare``: images/s of the shared prefix and of the tasks one after another; identical predictions?"""
    run_all(shared.forward_separately, images[:args.batch_size], args.batch_size, device)  # warm-up
    run_all(shared, images[:args.batch_size], args.batch_size, device)
    t_sh = t_sep = float("inf")
    for _ in range(args.repeats):  # interleaved, best of --repeats: robust to other load on the machine
        logits_sh, t = run_all(shared, images, args.batch_size, device)
        t_sh = min(t_sh, t)
        logits_sep, t = run_all(shared.forward_separately, images, args.batch_size, device)
        t_sep = min(t_sep, t)
    same = all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(logits_sh, logits_sep))
    diff = max(float((a - b).abs().max()) for a, b in zip(logits_sh, logits_sep))
    n = images.shape[0]
    note(f"compare ({n} images, {len(shared.tasks)} tasks, batch {args.batch_size}, {args.device}, "
         f"best of {args.repeats} interleaved runs, images already decoded):\n"
         f"  one after another: {t_sep:.3f}s  {n / t_sep:.1f} images/s\n"
         f"  shared prefix:     {t_sh:.3f}s  {n / t_sh:.1f} images/s  ({t_sep / t_sh:.2f}x)\n"
         f"  predictions identical: {'yes' if same else 'NO'} (max |logit difference| {diff:.3g})")
    return same


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        deltas = read_task_deltas(args)
        paths = collect_images(args.images)
        shared = shared_model_from_deltas(deltas, load_path=args.load_path,
                                          allow_backbone_mismatch=args.allow_backbone_mismatch, log=note)
        spec = deltas[0].spec
        images = load_images(paths, spec.img_size, args.benchmark, spec.mean, spec.std)
    except (*USER_ERROR_TYPES, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shared.to(device)
    names = unique_names(shared.names)
    note(f"{len(names)} tasks on {spec.backbone} ({spec.img_size} px): {', '.join(names)}; shared prefix: blocks "
         f"0-{shared.resume - 1} (inputs of blocks {shared.record} computed once)")
    logits, dt = run_all(shared, images, args.batch_size, device)
    bad = {nm: int((~torch.isfinite(lg)).any(dim=-1).sum()) for nm, lg in zip(names, logits)}
    bad = {nm: k for nm, k in bad.items() if k}
    if bad:
        note(f"error: non-finite logits (NaN or inf) for some images: {bad} (images per task); the delta or the "
             f"backbone weights give no usable prediction; nothing written")
        return 1
    n = len(paths)
    note(f"shared prefix: {n} images x {len(names)} tasks in {dt:.3f}s ({n / dt:.1f} images/s)")
    fmt = "json" if args.output and args.output.endswith(".json") else "csv"
    text = format_output(fmt, paths, names, logits, deltas, args.topk)
    if args.output:
        try:
            atomic_write_text(args.output, text)
        except WriteError as e:
            note(f"error: {e}")
            return 1
        note(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    if args.compare and not compare(shared, images, args, device):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
