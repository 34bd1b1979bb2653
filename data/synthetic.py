"""Small generated data roots in the real layouts of the three benchmarks and of your own data (tests, the demo).

Everything is deterministic given ``seed``. Images are real PNG/JPEG files. With ``kind="shapes"`` (default)
the images are LEARNABLE procedural scenes in the spirit of VTAB's dSprites/CLEVR tasks: each class fixes some
*factors* of a scene (object shape, colour, position, size, orientation, number of objects, background), every
other factor is random nuisance, and pixel noise is added. Each VTAB task has its own label factors (below), so
pre-training on one task and transferring to another is a real transfer problem: e.g. ``dsprites_loc``
labels the 4 x 4 grid cell of one object, ``clevr_count`` the number of objects (1-8), ``clevr_dist`` the
object size, ``dsprites_ori`` the orientation of a bar. ``kind="noise"`` writes uniform-noise images (not
learnable; plumbing only).

Factors (cardinality): ``shape`` 4 (circle, square, triangle, plus), ``colour`` 6 (red, green, blue, yellow,
magenta, cyan), ``quadrant`` 4, ``grid`` 16 (4 x 4 cells), ``size`` k bins, ``angle`` k bins over 180 degrees
(of an elongated bar), ``count`` k (1..k objects), ``ybin`` k (vertical position), ``bg`` 2 (dark, light).
A class index is written in mixed radix over the task's factors (first factor varies fastest).
"""
from __future__ import annotations

import math
import os
import zlib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from utils.atomic import atomic_write_text

from .domain_generalization import DG_NUM_CLASSES, DG_SHOT, DG_TARGETS, canonical_dg_target
from .few_shot import FGFS_DATASETS, FGFS_SEEDS, FGFS_SHOTS, SPLIT_DIR, canonical_fgfs_name
from .vtab import get_vtab_task

__all__ = [
    "TASK_FACTORS", "GENERIC_FACTORS", "factors_for", "spread_labels", "render_scene", "make_image",
    "make_vtab_root", "make_fgfs_root", "make_dg_root", "make_folder_root", "FOLDER_CLASSES",
]

Factors = Tuple[Tuple[str, int], ...]

#: Label factors of each VTAB task (mixed radix, product >= class count).
TASK_FACTORS: Dict[str, Factors] = {
    "cifar_100": (("shape", 4), ("colour", 6), ("quadrant", 4), ("size", 2)),
    "caltech101": (("colour", 6), ("shape", 4), ("quadrant", 4), ("size", 2)),
    "dtd": (("shape", 4), ("colour", 6), ("size", 2)),
    "flowers102": (("colour", 6), ("quadrant", 4), ("shape", 4), ("bg", 2)),
    "pets": (("shape", 4), ("colour", 6), ("bg", 2)),
    "svhn": (("shape", 4), ("colour", 6)),
    "sun397": (("shape", 4), ("colour", 6), ("quadrant", 4), ("size", 3), ("bg", 2)),
    "patch_camelyon": (("shape", 2),),
    "eurosat": (("colour", 6), ("size", 2)),
    "resisc45": (("shape", 4), ("colour", 6), ("size", 2)),
    "diabetic_retinopathy": (("size", 5),),
    "clevr_count": (("count", 8),),
    "clevr_dist": (("size", 6),),
    "dmlab": (("colour", 6),),
    "kitti": (("quadrant", 4),),
    "dsprites_loc": (("grid", 16),),
    "dsprites_ori": (("angle", 8), ("size", 2)),
    "smallnorb_azi": (("angle", 6), ("colour", 3)),
    "smallnorb_ele": (("ybin", 3), ("size", 3)),
}

#: Factors for other class counts (few-shot datasets, 1000-class ImageNet): product 1152.
GENERIC_FACTORS: Factors = (("shape", 4), ("colour", 6), ("quadrant", 4), ("size", 3), ("bg", 2), ("count", 2))

_PALETTE = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40), (210, 50, 210), (40, 210, 220)]
_SS = 2  # supersampling factor of the renderer (antialiasing)


def factors_for(num_classes: int, task: Optional[str] = None) -> Factors:
    """The label factors of a VTAB task, or the shortest prefix of :data:`GENERIC_FACTORS` covering the classes."""
    if task is not None and task in TASK_FACTORS:
        f = TASK_FACTORS[task]
    else:
        f, prod = (), 1
        for item in GENERIC_FACTORS:
            if prod >= num_classes:
                break
            f, prod = f + (item,), prod * item[1]
    if math.prod(c for _, c in f) < num_classes:
        raise ValueError(f"factors {f} cannot encode {num_classes} classes")
    return f


def _digits(label: int, factors: Factors) -> Dict[str, Tuple[int, int]]:
    out = {}
    for name, card in factors:
        out[name] = (label % card, card)
        label //= card
    return out


def spread_labels(n: int, num_classes: int, rng: np.random.Generator) -> List[int]:
    """``n`` labels covering the whole class range: every class in turn when ``n >= num_classes``, otherwise
    evenly spaced from 0 to ``num_classes - 1`` (both ends included); shuffled."""
    if n <= 0:
        return []
    if n >= num_classes:
        labels = [i % num_classes for i in range(n)]
    elif n == 1:
        labels = [num_classes - 1]
    else:
        labels = [int(round(i * (num_classes - 1) / (n - 1))) for i in range(n)]
    rng.shuffle(labels)
    return labels


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.8, y * 0.8) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "plus":
        w = 0.33
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
               (-w, -w)]
    elif shape == "bar":
        pts = [(-1, -0.28), (1, -0.28), (1, 0.28), (-1, 0.28)]
    else:
        raise ValueError(shape)
    ca, sa = math.cos(angle), math.sin(angle)
    r = r * _AREA_SCALE[shape]
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


# Polygons are scaled to the area of the circle of radius r, so the object size is one number (its area) for
# every shape; _EXTENT is the farthest point from the centre in units of r (to keep objects inside the image).
_AREA_SCALE = {"circle": 1.0, "square": math.sqrt(math.pi / 2.56),
               "triangle": math.sqrt(math.pi / (3 * math.sqrt(3) / 4)),
               "plus": math.sqrt(math.pi / (2 * 2 * 0.66 - 0.66 ** 2)), "bar": 1.0}
_EXTENT = {"circle": 1.0, "square": 0.8 * math.sqrt(2) * _AREA_SCALE["square"], "triangle": _AREA_SCALE["triangle"],
           "plus": math.hypot(1, 0.33) * _AREA_SCALE["plus"], "bar": math.hypot(1, 0.28)}


_SHAPES = ("circle", "square", "triangle", "plus")


def render_scene(objects: Sequence[dict], img_size: int, bg_level: float, noise: float,
                 rng: np.random.Generator) -> Image.Image:
    """Draw ``objects`` (dicts with shape, colour, cx, cy, r, angle in pixel units of ``img_size``) on a grey
    background of level ``bg_level`` and add Gaussian pixel noise of std ``noise``."""
    big = img_size * _SS
    img = Image.new("RGB", (big, big), (int(bg_level),) * 3)
    draw = ImageDraw.Draw(img)
    for o in objects:
        cx, cy, r = o["cx"] * _SS, o["cy"] * _SS, o["r"] * _SS
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o["colour"])
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r, o["angle"]), fill=o["colour"])
    img = img.resize((img_size, img_size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, noise, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _colour(rng: np.random.Generator, idx: Optional[int] = None) -> Tuple[int, int, int]:
    base = _PALETTE[int(rng.integers(len(_PALETTE))) if idx is None else idx]
    return tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in base)


def _bin_value(rng: np.random.Generator, b: int, k: int, lo: float, hi: float) -> float:
    """A value inside bin ``b`` of ``k`` equal bins of [lo, hi], away from the bin edges."""
    w = (hi - lo) / k
    return lo + w * (b + 0.5 + rng.uniform(-0.3, 0.3))


def make_image(label: int, factors: Factors, img_size: int, rng: np.random.Generator, kind: str = "shapes"
               ) -> Image.Image:
    """One image of class ``label`` under ``factors`` (see the module docstring)."""
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, size=(img_size, img_size, 3), dtype=np.uint8))
    if kind != "shapes":
        raise ValueError(f"unknown synthetic image kind {kind!r}; valid: shapes, noise")
    d = _digits(label, factors)
    S = float(img_size)
    bg = d.get("bg", (int(rng.integers(2)), 2))[0]
    bg_level = rng.uniform(25, 80) if bg == 0 else rng.uniform(150, 205)
    n_obj = d["count"][0] + 1 if "count" in d else 1
    # Largest radius the layout allows; a 'size' label picks one of k bins of [0.3, 1] x that radius
    # ([0.55, 1] when the shape or the orientation is a label factor too).
    if "angle" in d:
        r_max = 0.42 * S
    elif "grid" in d:
        r_max = 0.11 * S
    elif n_obj > 1:
        r_max = 0.10 * S
    elif "quadrant" in d:
        r_max = 0.16 * S
    elif "ybin" in d:
        r_max = min(0.30, 0.5 / d["ybin"][1]) * S
    else:
        r_max = 0.30 * S
    objects: List[dict] = []
    for k in range(n_obj):
        if "size" in d:  # small objects must still show their shape when the shape is part of the label
            b, c = d["size"]
            r = _bin_value(rng, b, c, (0.55 if "shape" in d or "angle" in d else 0.3) * r_max, r_max)
        else:
            r = rng.uniform(0.6, 0.8) * r_max
        if "angle" in d:
            shape = "bar"
            b, c = d["angle"]
            angle = math.pi * (b + 0.5 + rng.uniform(-0.25, 0.25)) / c
        else:
            shape = _SHAPES[d["shape"][0]] if "shape" in d else _SHAPES[int(rng.integers(4))]
            angle = rng.uniform(-0.25, 0.25)
        colour = _colour(rng, d["colour"][0] if "colour" in d else None)
        # Position: from the label when a position factor is set, else random (objects stay inside).
        margin = min(r * _EXTENT[shape] * 1.05, 0.49 * S)
        if "grid" in d:
            cell = d["grid"][0]
            cx = _bin_value(rng, cell % 4, 4, 0, S)
            cy = _bin_value(rng, cell // 4, 4, 0, S)
        elif "quadrant" in d:
            q = d["quadrant"][0]
            cx = (0.25 + 0.5 * (q % 2)) * S + rng.uniform(-0.03, 0.03) * S
            cy = (0.25 + 0.5 * (q // 2)) * S + rng.uniform(-0.03, 0.03) * S
        elif "ybin" in d:
            b, c = d["ybin"]
            cx = rng.uniform(margin, S - margin)
            cy = _bin_value(rng, b, c, 0, S)
        else:
            cx, cy = rng.uniform(margin, S - margin), rng.uniform(margin, S - margin)
            for _ in range(30):  # several objects: avoid overlaps so they can be counted
                if all(math.hypot(cx - o["cx"], cy - o["cy"]) > r + o["r"] + 1 for o in objects):
                    break
                cx, cy = rng.uniform(margin, S - margin), rng.uniform(margin, S - margin)
        objects.append(dict(shape=shape, colour=colour, cx=cx, cy=cy, r=r, angle=angle))
    return render_scene(objects, img_size, bg_level, noise=6.0, rng=rng)


def _rng(seed: int, *keys) -> np.random.Generator:
    return np.random.default_rng([int(seed)] + [zlib.crc32(str(k).encode()) for k in keys])


def _save(img: Image.Image, path: str, fmt: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if fmt == "png":
        img.save(path, format="PNG")
    elif fmt == "jpeg":
        img.save(path, format="JPEG", quality=92)
    else:
        raise ValueError(f"unknown image format {fmt!r}; valid: png, jpeg")


def _write_list(path: str, rows: Iterable[Tuple[str, int]]) -> None:
    atomic_write_text(path, "".join(f"{p} {y}\n" for p, y in rows))


def _ext(fmt: str) -> str:
    return {"png": "png", "jpeg": "jpg"}[fmt]


def _write_note(root: str, text: str) -> None:
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "SYNTHETIC.txt"), "w", encoding="utf-8") as f:
        f.write(text)


def make_vtab_root(
        root: str,
        tasks: Sequence[str] = ("cifar_100",),
        n_train: int = 16,
        n_val: int = 8,
        n_test: int = 16,
        img_size: int = 32,
        seed: int = 0,
        kind: str = "shapes",
        image_format: str = "png",
) -> str:
    """Write a VTAB-1k-layout root: ``<root>/<folder>/{train800,val200,train800val200,test}.txt`` + images.

    ``n_train`` / ``n_val`` / ``n_test`` images per task (the real benchmark has 800 / 200 / several thousand;
    ``train800val200`` lists the train and val images together, as in the real data). Labels cover each
    task's whole class range. Returns ``root``.
    """
    ext = _ext(image_format)
    for name in tasks:
        task = get_vtab_task(name)
        factors = factors_for(task.num_classes, task.name)
        folder = os.path.join(root, task.folder)
        rows: Dict[str, List[Tuple[str, int]]] = {}
        for split, n in (("train800", n_train), ("val200", n_val), ("test", n_test)):
            rng = _rng(seed, "vtab", task.name, split)
            rows[split] = []
            for i, y in enumerate(spread_labels(n, task.num_classes, rng)):
                rel = f"images/{split}/{i:06d}.{ext}"
                _save(make_image(y, factors, img_size, rng, kind), os.path.join(folder, rel), image_format)
                rows[split].append((rel, y))
        rows["train800val200"] = rows["train800"] + rows["val200"]
        for split in ("train800", "val200", "train800val200", "test"):
            _write_list(os.path.join(folder, f"{split}.txt"), rows[split])
    _write_note(root, f"Synthetic VTAB-layout data written by data/synthetic.py (kind={kind}, seed={seed}, "
                      f"img_size={img_size}); tasks: {', '.join(tasks)}. Not the real benchmark.\n")
    return root


def _class_subset(num_classes: int, k: int) -> List[int]:
    k = min(k, num_classes)
    if k == 1:
        return [num_classes - 1]
    return sorted({int(round(i * (num_classes - 1) / (k - 1))) for i in range(k)})


def make_fgfs_root(
        root: str,
        datasets: Sequence[str] = tuple(FGFS_DATASETS),
        shots: Sequence[int] = FGFS_SHOTS,
        seeds: Sequence[int] = FGFS_SEEDS,
        classes_per_dataset: int = 4,
        n_val_per_class: int = 1,
        n_test_per_class: int = 2,
        img_size: int = 32,
        seed: int = 0,
        kind: str = "shapes",
        image_format: str = "jpeg",
) -> str:
    """Write an FGFS-layout root (``few-shot_split/<ds>/annotations/...`` + ``<ds>/images/...``).

    Each dataset uses ``classes_per_dataset`` classes spread over its whole class range (0 and the last class
    included); each ``train_meta.list.num_shot_{k}.seed_{s}`` holds exactly ``k`` images per used class,
    drawn per seed from a pool of ``max(shots)`` images per class. File and folder names contain spaces.
    Returns ``root``.
    """
    ext = _ext(image_format)
    pool_n = max(shots)
    for name in datasets:
        ds = canonical_fgfs_name(name)
        C = FGFS_DATASETS[ds]
        factors = factors_for(C)
        classes = _class_subset(C, classes_per_dataset)
        img_root = os.path.join(root, ds)
        ann = os.path.join(root, SPLIT_DIR, ds, "annotations")
        pools: Dict[int, List[str]] = {}
        evals: Dict[str, List[Tuple[str, int]]] = {"val": [], "test": []}
        for c in classes:
            rng = _rng(seed, "fgfs", ds, c)
            pools[c] = []
            for j in range(pool_n):
                rel = f"images/class {c:03d}/train img {j:03d}.{ext}"
                _save(make_image(c, factors, img_size, rng, kind), os.path.join(img_root, rel), image_format)
                pools[c].append(rel)
            for split, n in (("val", n_val_per_class), ("test", n_test_per_class)):
                for j in range(n):
                    rel = f"images/class {c:03d}/{split} img {j:03d}.{ext}"
                    _save(make_image(c, factors, img_size, rng, kind), os.path.join(img_root, rel), image_format)
                    evals[split].append((rel, c))
        for split in ("val", "test"):
            _write_list(os.path.join(ann, f"{split}_meta.list"), evals[split])
        for k in shots:
            for s in seeds:
                rng = _rng(s, "fgfs-split", ds, k)
                rows = [(pools[c][j], c) for c in classes for j in sorted(rng.choice(pool_n, size=k, replace=False))]
                order = rng.permutation(len(rows))
                _write_list(os.path.join(ann, f"train_meta.list.num_shot_{k}.seed_{s}"), [rows[i] for i in order])
    _write_note(root, f"Synthetic FGFS-layout data written by data/synthetic.py (kind={kind}, seed={seed}, "
                      f"img_size={img_size}); datasets: {', '.join(datasets)}; {classes_per_dataset} classes "
                      f"each. Not the real benchmark.\n")
    return root


def _dg_style(img: Image.Image, target: str, rng: np.random.Generator) -> Image.Image:
    """A cheap 'domain shift' per target (sketch = grey edges, rendition = posterised, adversarial = noisy)."""
    if target == "imagenet-sketch":
        return ImageOps.invert(img.convert("L").filter(ImageFilter.FIND_EDGES)).convert("RGB")
    if target == "imagenet-rendition":
        return ImageOps.posterize(img, 2)
    if target == "imagenet-adversarial":
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 30, size=(img.size[1], img.size[0], 3))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if target == "imagenetv2":
        return img.filter(ImageFilter.GaussianBlur(0.6))
    return img


def _dg_target_path(target: str, c: int, j: int, ext: str) -> str:
    wnid = f"n{c:08d}"
    return {
        "imagenet": f"{wnid}/ILSVRC2012_val_{c * 100 + j:08d}.JPEG",  # relative to imagenet/images/val/
        "imagenetv2": f"imagenetv2-matched-frequency-format-val/{c}/{j:04d}.jpeg",
        "imagenet-sketch": f"images/{wnid}/sketch_{j}.JPEG",
        "imagenet-adversarial": f"imagenet-a/{wnid}/adv example {j}.jpg",
        "imagenet-rendition": f"imagenet-r/{wnid}/art_{j}.jpg",
    }[target]


def make_dg_root(
        root: str,
        targets: Sequence[str] = DG_TARGETS,
        classes: int = 4,
        shot: int = DG_SHOT,
        seeds: Sequence[int] = FGFS_SEEDS,
        n_target_per_class: int = 2,
        img_size: int = 32,
        seed: int = 0,
        kind: str = "shapes",
) -> str:
    """Write a DG-layout root: ImageNet ``shot``-shot source lists for ``seeds`` (``imagenet/annotations/
    train_meta.list.num_shot_{shot}.seed_{s}``, images under ``imagenet/images/train/``) and each target's
    ``annotations/val_meta.list`` (``imagenet``: paths relative to ``imagenet/images/val/``; others relative
    to ``<target>/``). ``classes`` classes spread over the 1000-class range. Returns ``root``.
    """
    fmt, ext = "jpeg", "JPEG"
    factors = factors_for(DG_NUM_CLASSES)
    used = _class_subset(DG_NUM_CLASSES, classes)
    pool_n = shot + 2
    train_root = os.path.join(root, "imagenet", "images", "train")
    pools: Dict[int, List[str]] = {}
    for c in used:
        rng = _rng(seed, "dg-train", c)
        wnid = f"n{c:08d}"
        pools[c] = []
        for j in range(pool_n):
            rel = f"{wnid}/{wnid}_{j}.{ext}"
            _save(make_image(c, factors, img_size, rng, kind), os.path.join(train_root, rel), fmt)
            pools[c].append(rel)
    for s in seeds:
        rng = _rng(s, "dg-split")
        rows = [(pools[c][j], c) for c in used for j in sorted(rng.choice(pool_n, size=shot, replace=False))]
        order = rng.permutation(len(rows))
        _write_list(os.path.join(root, "imagenet", "annotations", f"train_meta.list.num_shot_{shot}.seed_{s}"),
                    [rows[i] for i in order])
    for name in targets:
        t = canonical_dg_target(name)
        base = os.path.join(root, "imagenet", "images", "val") if t == "imagenet" else os.path.join(root, t)
        rows = []
        for c in used:
            rng = _rng(seed, "dg-target", t, c)
            for j in range(n_target_per_class):
                rel = _dg_target_path(t, c, j, ext)
                img = _dg_style(make_image(c, factors, img_size, rng, kind), t, rng)
                _save(img, os.path.join(base, rel), fmt)
                rows.append((rel, c))
        _write_list(os.path.join(root, t, "annotations", "val_meta.list"), rows)
    _write_note(root, f"Synthetic DG-layout data written by data/synthetic.py (kind={kind}, seed={seed}, "
                      f"img_size={img_size}); {len(used)} of 1000 classes; targets: {', '.join(targets)}. "
                      f"Not the real benchmark.\n")
    return root


#: Class names of :func:`make_folder_root` (spaces and non-ASCII letters on purpose; .txt lists need names
#: without spaces).
FOLDER_CLASSES: Tuple[str, ...] = ("red circle", "grün square", "blue triangle", "étoile")


def make_folder_root(
        root: str,
        classes: Sequence[str] = FOLDER_CLASSES,
        layout: str = "folders",
        n_train: int = 4,
        n_val: int = 0,
        n_test: int = 2,
        header: bool = False,
        names: bool = True,
        classes_file: bool = False,
        img_size: int = 32,
        seed: int = 0,
) -> str:
    """Write a root of "your own data" (``--benchmark folder``): ``n_*`` images per class and split under
    ``<split>/<class>/`` (file names with spaces and unicode), plus, for ``layout`` ``txt`` / ``csv``, the list
    files ``<split>.txt`` / ``<split>.csv`` pointing at them (with a ``header`` line; labels as class ``names``
    or indices). ``classes_file`` writes ``classes.txt`` (in the given order). ``n_val = 0``: no val split.
    Returns ``root``."""
    if layout not in ("folders", "txt", "csv"):
        raise ValueError(f"unknown layout {layout!r}; valid: folders, txt, csv")
    if layout == "txt" and names and any(len(c.split()) != 1 for c in classes):
        raise ValueError("a .txt list's label is its last field: class names with spaces need layout='csv'")
    factors = factors_for(len(classes))
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rows: List[Tuple[str, str]] = []
        for c, name in enumerate(classes):
            rng = _rng(seed, "folder", split, c)
            for j in range(n):
                rel = f"{split}/{name}/bild {j:02d} ü.png"
                _save(make_image(c, factors, img_size, rng), os.path.join(root, rel), "png")
                rows.append((rel, name if names else str(c)))
        if not rows or layout == "folders":
            continue
        if layout == "csv":
            text = "".join(f'"{p}",{y}\n' for p, y in [("path", "label")] * header + rows)
        else:
            text = "".join(f"{p} {y}\n" for p, y in [("path", "label")] * header + rows)
        atomic_write_text(os.path.join(root, f"{split}.{layout}"), text)
    if classes_file:
        atomic_write_text(os.path.join(root, "classes.txt"), "".join(f"{c}\n" for c in classes))
    return root
