#!/usr/bin/env python3
"""Multi-task inference: one frozen ViT/Swin backbone, several DTL delta checkpoints, one pass through the shared prefix.

DTL leaves the backbone untouched; a task is only its side network and head (a "delta" of ~0.04 M tensors).
Before the earliest add-back block ``P`` among the tasks no task changes the tokens, so the inputs of blocks
``0..P`` are the same for every task: they are computed once per image, every task's taps before ``P`` read
these shared inputs, and then each task runs its own tail (blocks ``P..L-1`` with its side network, and its
head).  Swin: blocks are numbered globally across stages, the input of a stage's first block is taken after
its patch merging, and (the side sum restarting at every stage) only the taps of ``P``'s stage before ``P``
matter.  The results are identical to running the tasks' models one after another (same operations on the
same values); ``--compare`` measures both and checks it.

Delta files (``--deltas``), each one of:

- a delta folder (``config.json`` + ``delta.safetensors``, :mod:`models.hub`; ``train.py --delta_folder``);
- a delta checkpoint written by ``train.py`` (``{"format": "dtl-delta/1", "delta": {name: tensor},
  "model_config": model.model_config(), "method": "dtl"|"dtl+", "backbone": "<--model>",
  "model_kwargs": {"img_size": ...}, "dataset": ...}``); ``"state_dict"`` is accepted in place of ``"delta"``;
- a plain dict ``{name: tensor}`` of the trainable tensors (``side.taps.<i>.lora_A/B``, ``side.fusion.conv.weight``,
  ``head.weight/bias``, as :func:`models.trainable.delta_state_dict` writes them; Swin: ``side.<stage>.taps...``,
  ``side.<stage>.fusion.conv.weight``): rank, taps, fusion size and class count are read from the tensors; the
  add-back blocks cannot be, so ``--add_back_blocks`` is required (and ``--beta`` if it was not 100).

All deltas must be DTL/DTL+ on the same ViT or Swin backbone name and image size (the backbone weights come from
``--load_path``). A ``train.py`` delta's checksum is verified, and a delta recording other backbone weights than
``--load_path``'s is refused (``--allow_backbone_mismatch`` uses it anyway, with a note); non-finite tensors in a
delta or non-finite logits are an error (exit status 1 or 2, nothing written).  Output (``--output``, ``.csv`` or ``.json``): per image and task the predicted class and its
softmax probability.

Example::

    python tools/predict.py --load_path ViT-B_16.npz --deltas runs/cifar/delta.pth runs/dtd/delta.pth \\
        --images my_images/ --output predictions.csv --compare
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from PIL import Image  # noqa: E402

from data.listfile import to_rgb  # noqa: E402
from data.transforms import build_transform  # noqa: E402
from models.backbones import backbone_arch, create_backbone  # noqa: E402
from models.config import DTLConfig, parse_blocks  # noqa: E402
from models.factory import DTL_WRAPPERS  # noqa: E402
from models.hub import read_delta_folder  # noqa: E402
from models.pretrained import (  # noqa: E402
    CheckpointError, check_backbone_match, load_backbone_weights, weights_record,
)
from models.trainable import load_delta_state_dict  # noqa: E402
from utils.checkpoint import (  # noqa: E402
    DELTA_FORMAT, WriteError, atomic_write_text, load_torch_file, non_finite_tensors, verify_checksum,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


@dataclass
class TaskDelta:
    """One task: its name, source file, model configuration and trainable tensors."""

    name: str
    path: str
    num_classes: int
    dtl: DTLConfig
    tensors: Dict[str, torch.Tensor]
    backbone: Optional[str] = None
    img_size: Optional[int] = None
    extra_kwargs: Optional[Dict[str, Any]] = None
    arch: Optional[str] = None  # 'vit' | 'swin' (None: not known from the file)
    backbone_weights: Optional[Dict[str, Any]] = None  # train.py's record of the weights it was trained on
    from_train: bool = False  # a train.py delta checkpoint (not a plain tensor dict)


# ViT: side.taps.<block>.lora_A; Swin: side.<stage>.taps.<block>.lora_A (and side[.<stage>].fusion.conv.weight)
_PLAIN_TAP = re.compile(r"^side\.(?:(\d+)\.)?taps\.(\d+)\.lora_A$")
_PLAIN_FUSION = re.compile(r"^side\.(?:\d+\.)?fusion\.conv\.weight$")


def _infer_plain_delta(path: str, sd: Mapping[str, torch.Tensor], add_back: Optional[str],
                       beta: float) -> Tuple[int, DTLConfig, str]:
    if "head.weight" not in sd:
        raise CheckpointError(f"{path}: a plain tensor dict must hold head.weight (the classifier)")
    matches = [m for m in (_PLAIN_TAP.match(k) for k in sd) if m]
    if not matches:
        raise CheckpointError(f"{path}: no side.taps.<i>.lora_A (ViT) or side.<stage>.taps.<i>.lora_A (Swin) "
                              "tensors: not a DTL delta")
    staged = {m.group(1) is not None for m in matches}
    if len(staged) > 1:
        raise CheckpointError(f"{path}: mixes ViT (side.taps.*) and Swin (side.<stage>.taps.*) tap names")
    arch = "swin" if staged.pop() else "vit"
    taps = sorted(int(m.group(2)) for m in matches)
    if add_back is None:
        raise CheckpointError(f"{path} is a plain tensor dict without its model configuration: give "
                              "--add_back_blocks (e.g. 6-11) so the side network can be rebuilt")
    r = int(sd[matches[0].group(0)].shape[0])
    fusions = [k for k in sd if _PLAIN_FUSION.match(k)]
    fusion = int(sd[fusions[0]].shape[-1]) if fusions else 0
    cfg = DTLConfig(r=r, beta=beta, fusion_size=fusion, csn_blocks=taps, add_back_blocks=parse_blocks(add_back))
    return int(sd["head.weight"].shape[0]), cfg, arch


def read_task_delta(path: str, add_back: Optional[str] = None, beta: float = 100.0) -> TaskDelta:
    """Read one delta file (see the module docstring); :class:`CheckpointError` naming the file otherwise."""
    if os.path.isdir(path):  # a delta folder (config.json + delta.safetensors, models.hub)
        ck = read_delta_folder(path)
    else:
        ck = load_torch_file(path, "delta")
    if not isinstance(ck, Mapping):
        raise CheckpointError(f"{path} does not hold a dict")
    name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    if all(isinstance(v, torch.Tensor) for v in ck.values()):
        _check_finite(path, ck)
        num_classes, cfg, arch = _infer_plain_delta(path, ck, add_back, beta)
        return TaskDelta(name, path, num_classes, cfg, dict(ck), arch=arch)
    if ck.get("format") == DELTA_FORMAT and not os.path.isdir(path):  # a folder's file hash was checked on read
        verify_checksum(ck, path, "delta checkpoint")
    tensors = ck.get("delta", ck.get("state_dict"))
    if not isinstance(tensors, Mapping) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"{path}: expected the trainable tensors under 'delta' (train.py) or 'state_dict'")
    _check_finite(path, tensors)
    mc = ck.get("model_config")
    if not isinstance(mc, Mapping) or "dtl" not in mc or "num_classes" not in mc:
        raise CheckpointError(f"{path}: 'model_config' with 'dtl' and 'num_classes' is required "
                              "(or pass a plain tensor dict with --add_back_blocks)")
    arch = mc.get("arch", "vit")
    if arch not in ("vit", "swin"):
        raise CheckpointError(f"{path}: architecture {arch!r}; shared-prefix inference supports ViT and Swin DTL deltas")
    method = ck.get("method", "dtl")
    if method not in ("dtl", "dtl+"):
        raise CheckpointError(f"{path}: method {method!r}; shared-prefix inference needs DTL/DTL+ deltas "
                              "(other methods change the early blocks)")
    kwargs = dict(ck.get("model_kwargs") or {})
    img_size = kwargs.pop("img_size", None)
    kwargs.pop("drop_path_rate", None)  # inference only
    if ck.get("dataset"):
        name = str(ck["dataset"])
    return TaskDelta(name, path, int(mc["num_classes"]), DTLConfig.from_dict(dict(mc["dtl"])), dict(tensors),
                     backbone=ck.get("backbone"), img_size=int(img_size) if img_size else None, extra_kwargs=kwargs,
                     arch=arch, backbone_weights=ck.get("backbone_weights"), from_train=ck.get("format") == DELTA_FORMAT)


def _check_finite(path: str, tensors: Mapping[str, Any]) -> None:
    bad = non_finite_tensors(tensors)
    if bad:
        raise CheckpointError(f"{path}: non-finite values (NaN or inf) in the delta's tensors {bad}")


class SharedPrefixDTL(nn.Module):
    """Several DTL tasks on one shared frozen ViT or Swin; the prefix before the earliest add-back runs once.

    Args:
        backbone: the frozen timm ViT or Swin (shared: each task's DTL wrapper wraps this same module).
        tasks: ``(name, num_classes, DTLConfig)`` per task.
        arch: ``'vit'`` or ``'swin'`` (:func:`models.backbones.backbone_arch` of the backbone's name).
    """

    def __init__(self, backbone: nn.Module, tasks: Sequence[Tuple[str, int, DTLConfig]], arch: str) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("no tasks")
        wrapper = DTL_WRAPPERS[arch]
        self.names = [t[0] for t in tasks]
        self.tasks = nn.ModuleList(wrapper(backbone, nc, cfg).eval() for _, nc, cfg in tasks)
        self.backbone = backbone
        self.resume = min(t.prefix_plan()[1] for t in self.tasks)
        self.task_taps = [sorted(int(k) for k in side.taps if int(k) < self.resume) if side is not None else []
                          for side in (t.prefix_side(self.resume) for t in self.tasks)]
        self.record = sorted(set(i for taps in self.task_taps for i in taps) | {self.resume})

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Logits of every task for ``images``."""
        first = self.tasks[0]
        grid = first.patch_grid(images)
        rec = first.record_block_inputs(images, self.record)
        out = []
        for model, taps in zip(self.tasks, self.task_taps):
            s = model.prefix_side_sum(self.resume, rec, taps)
            out.append(model.forward_head(model.forward_blocks(rec[self.resume], start=self.resume, s=s, grid=grid)))
        return out

    @torch.no_grad()
    def forward_separately(self, images: torch.Tensor) -> List[torch.Tensor]:
        """The same logits, each task's full model run on its own (the reference)."""
        return [model(images) for model in self.tasks]


def build_shared_model(
    deltas: Sequence[TaskDelta], model_name: Optional[str], load_path: Optional[str], img_size: Optional[int],
    allow_backbone_mismatch: bool = False,
) -> Tuple[SharedPrefixDTL, str, int]:
    """Check that the deltas fit one backbone, build it, load its weights and every delta (a train.py delta
    trained on other backbone weights is refused unless ``allow_backbone_mismatch``)."""
    names = {d.backbone for d in deltas if d.backbone}
    if model_name is None:
        if len(names) > 1:
            raise CheckpointError(f"the deltas were trained on different backbones: {sorted(names)}")
        if not names:
            raise CheckpointError("the deltas do not name their backbone: give --model")
        model_name = names.pop()
    else:
        other = [f"{d.path} ({d.backbone})" for d in deltas if d.backbone and d.backbone != model_name]
        if other:
            raise CheckpointError(f"--model {model_name}, but these deltas were trained on another backbone: {other}")
    arch = backbone_arch(model_name)
    other = [f"{d.path} ({d.arch})" for d in deltas if d.arch and d.arch != arch]
    if other:
        raise CheckpointError(f"--model {model_name} is a {arch} backbone, but these deltas are for another "
                              f"architecture: {other}")
    sizes = {d.img_size for d in deltas if d.img_size}
    if img_size is None:
        if len(sizes) > 1:
            raise CheckpointError(f"the deltas use different image sizes {sorted(sizes)}; they cannot share a backbone")
        img_size = sizes.pop() if sizes else 224
    else:
        other = [f"{d.path} ({d.img_size})" for d in deltas if d.img_size and d.img_size != img_size]
        if other:
            raise CheckpointError(f"--img_size {img_size}, but these deltas were trained at another size: {other}")
    extras = [d.extra_kwargs or {} for d in deltas]
    if any(e != extras[0] for e in extras):
        raise CheckpointError(f"the deltas were built with different backbone settings: {extras}")
    backbone = create_backbone(model_name, img_size=img_size, **extras[0])
    shared = SharedPrefixDTL(backbone, [(d.name, d.num_classes, d.dtl) for d in deltas], arch)
    if load_path:
        load_backbone_weights(shared.tasks[0], load_path)
    current = weights_record(backbone)
    note = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    for d in deltas:
        if d.from_train:
            check_backbone_match(d.backbone_weights, current, d.path, allow_backbone_mismatch, log=note)
    for d, model in zip(deltas, shared.tasks):
        try:
            load_delta_state_dict(model, d.tensors, source=d.path)
        except ValueError as e:
            raise CheckpointError(str(e)) from e
    # the prefix must be the frozen, unmodified backbone for every task
    for model in shared.tasks:
        if model.backbone is not backbone or any(p.requires_grad for p in backbone.parameters()):
            raise CheckpointError("internal: the shared backbone must be frozen and shared")
    return shared.eval(), model_name, img_size


def collect_images(items: Sequence[str]) -> List[str]:
    """Image files from files, folders (recursively, sorted) and ``.txt`` lists (``path [label]`` per line,
    relative paths from the list's folder)."""
    out: List[str] = []
    for item in items:
        if os.path.isdir(item):
            found = []
            for root, _, files in os.walk(item):
                found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                raise FileNotFoundError(f"{item}: no image files in this folder")
            out += sorted(found)
        elif item.lower().endswith(".txt"):
            if not os.path.isfile(item):
                raise FileNotFoundError(f"{item}: image list not found")
            base = os.path.dirname(os.path.abspath(item))
            with open(item) as f:
                for n, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    head, _, tail = line.rpartition(" ")
                    path = head if head and tail.lstrip("-").isdigit() else line
                    path = path if os.path.isabs(path) else os.path.join(base, path)
                    if not os.path.isfile(path):
                        raise FileNotFoundError(f"{path}: image not found (listed at {item}:{n})")
                    out.append(path)
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image, folder or list")
    if not out:
        raise FileNotFoundError("no images given")
    return out


def load_images(paths: Sequence[str], img_size: int, benchmark: str) -> torch.Tensor:
    """The evaluation transform of ``benchmark`` (data.transforms) applied to every image, stacked."""
    tf = build_transform(benchmark, False, img_size)
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(tf(to_rgb(im, p)))  # 16-bit images scaled to 8 bits as in training
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{p}: unreadable image ({type(e).__name__}: {e})") from None
    return torch.stack(out)


def _batches(x: torch.Tensor, batch_size: int):
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size]


def run_all(fn, images: torch.Tensor, batch_size: int, device: torch.device) -> Tuple[List[torch.Tensor], float]:
    """Logits per task over all images, and the seconds it took (images already decoded)."""
    parts: List[List[torch.Tensor]] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for b in _batches(images, batch_size):
        parts.append([o.float().cpu() for o in fn(b.to(device, non_blocking=True))])
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
                  sources: Sequence[str]) -> str:
    """Predictions as ``'csv'`` (one row per image: ``<task>_class``, ``<task>_prob`` per task) or ``'json'``."""
    probs = [l.softmax(-1) for l in logits]
    if fmt == "json":
        obj = {
            "tasks": [{"name": n, "delta": s, "num_classes": int(l.shape[1])} for n, s, l in zip(names, sources, logits)],
            "predictions": [
                {"image": img, **{n: {"class": int(p[i].argmax()), "prob": float(p[i].max())} for n, p in zip(names, probs)}}
                for i, img in enumerate(image_paths)
            ],
        }
        return json.dumps(obj, indent=1) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", *[c for n in names for c in (f"{n}_class", f"{n}_prob")]])
    for i, img in enumerate(image_paths):
        w.writerow([img, *[v for p in probs for v in (int(p[i].argmax()), f"{float(p[i].max()):.6f}")]])
    return buf.getvalue()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="backbone name (default: the one the deltas name)")
    p.add_argument("--load_path", required=True, help="backbone weights (.npz/.pth/.safetensors), as for train.py")
    p.add_argument("--deltas", nargs="+", required=True, help="delta checkpoints or delta folders, one per task")
    p.add_argument("--images", nargs="+", required=True, help="image files, folders or .txt lists")
    p.add_argument("--output", default=None, help="predictions file (.csv or .json; default: CSV on stdout)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--img_size", type=int, default=None, help="default: the deltas' (else 224)")
    p.add_argument("--benchmark", default="vtab", help="whose evaluation transform to use (vtab, few_shot, domain_generalization)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--add_back_blocks", default=None, help="for plain tensor-dict deltas: their add-back blocks")
    p.add_argument("--beta", type=float, default=100.0, help="for plain tensor-dict deltas: their swish beta")
    p.add_argument("--allow_backbone_mismatch", action="store_true",
                   help="use deltas with backbone weights other than the ones they were trained on (otherwise "
                        "refused; the mismatch is reported)")
    p.add_argument("--compare", action="store_true",
                   help="also run the tasks one after another: report images/s of both and check identical predictions")
    p.add_argument("--repeats", type=int, default=3, help="--compare: timed runs of each way (the best counts)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        deltas = [read_task_delta(d, args.add_back_blocks, args.beta) for d in args.deltas]
        paths = collect_images(args.images)
        shared, model_name, img_size = build_shared_model(deltas, args.model, args.load_path, args.img_size,
                                                          args.allow_backbone_mismatch)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    shared.to(device)
    names = unique_names([d.name for d in deltas])
    print(f"{len(names)} tasks on {model_name} ({img_size} px): {', '.join(names)}; shared prefix: blocks "
          f"0-{shared.resume - 1} (inputs of blocks {shared.record} computed once)", file=sys.stderr)
    try:
        images = load_images(paths, img_size, args.benchmark)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logits, dt = run_all(shared, images, args.batch_size, device)
    bad = {nm: int((~torch.isfinite(lg)).any(dim=-1).sum()) for nm, lg in zip(names, logits)}
    bad = {nm: k for nm, k in bad.items() if k}
    if bad:
        print(f"error: non-finite logits (NaN or inf) for some images: {bad} (images per task); the delta or the "
              f"backbone weights give no usable prediction; nothing written", file=sys.stderr)
        return 1
    n = len(paths)
    print(f"shared prefix: {n} images x {len(names)} tasks in {dt:.3f}s ({n / dt:.1f} images/s)", file=sys.stderr)
    fmt = "json" if args.output and args.output.endswith(".json") else "csv"
    text = format_output(fmt, paths, names, logits, args.deltas)
    if args.output:
        try:
            atomic_write_text(args.output, text)
        except WriteError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.compare:
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
        print(f"compare ({n} images, {len(names)} tasks, batch {args.batch_size}, {args.device}, "
              f"best of {args.repeats} interleaved runs, images already decoded):\n"
              f"  one after another: {t_sep:.3f}s  {n / t_sep:.1f} images/s\n"
              f"  shared prefix:     {t_sh:.3f}s  {n / t_sh:.1f} images/s  ({t_sep / t_sh:.2f}x)\n"
              f"  predictions identical: {'yes' if same else 'NO'} (max |logit difference| {diff:.3g})", file=sys.stderr)
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
