"""Image transforms of the original recipes (docs/method.md, sections 2-3), built from timm's own implementations.

* ``vtab`` (train = test, no augmentation): Resize((s, s), bicubic) -> CenterCrop(s) -> ToTensor -> Normalize.
* ``few_shot`` / ``domain_generalization``:
    - train: timm RandomResizedCropAndInterpolation(s, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic)
      -> RandomHorizontalFlip(0.5) -> timm RandAugment ``rand-m9-mstd0.5-inc1`` (hparams exactly as timm's
      ``create_transform`` derives them: ``translate_const=int(0.45 * s)`` = 100 at 224, ``img_mean=(128,128,128)``
      as fill, bicubic resampling) -> ToTensor -> Normalize. No colour jitter (timm disables it under
      RandAugment), no random erasing. This is exactly ``timm.data.create_transform(s, is_training=True,
      auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', mean=DTL_MEAN, std=DTL_STD, re_prob=0)``,
      assembled piece by piece so its settings are visible and tested.
      (Note: the ``inc1`` op set translates with ``TranslateXRel/YRel``, i.e. ``translate_pct`` = 0.45 of the
      image size; ``translate_const`` is carried in the hparams as in the original but only the absolute
      ``TranslateX/Y`` ops, not used by this policy, read it.)
    - test: Resize((int(s * 256 / 224),) * 2, bicubic) -> CenterCrop(s) -> ToTensor -> Normalize
      (256 x 256 then 224 at the default size).
* Posterize at 0 bits: at magnitude 10 (the N(9, 0.5) draw clamped to 10, ~0.15% of training images)
  ``PosterizeIncreasing`` keeps 4 - 4 = 0 bits. Pillow < 13 turned that into an all-black image (what the
  original trained with); Pillow >= 13 raises ``ValueError``. :func:`rand_augment` builds timm's RandAugment and
  replaces only the posterize function of its posterize ops with :func:`posterize`, which returns the black image
  at 0 bits and calls timm's posterize otherwise; every other op and every random draw is timm's.
* Normalisation: mean = std = (0.5, 0.5, 0.5) after scaling to [0, 1] (every original recipe).

``normalize=False`` returns the same pipeline ending in ``PILToTensor`` instead of ``ToTensor + Normalize``:
a ``uint8`` tensor ``C x H x W`` with values 0..255, for a loader that moves uint8 batches to the GPU and
normalises there with :func:`normalize_uint8_batch` (which performs exactly the operations of
``ToTensor`` + ``Normalize``, in the same order, so both paths give bit-identical float32 inputs).
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_aa
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from .benchmarks import BENCHMARKS, canonical_benchmark, get_benchmark

__all__ = [
    "DTL_MEAN", "DTL_STD", "RAND_AUGMENT", "BENCHMARKS", "canonical_benchmark", "build_transform",
    "transform_is_deterministic", "normalize_uint8_batch", "Uint8Normalizer", "rand_augment_hparams",
    "rand_augment", "posterize",
]

DTL_MEAN: Tuple[float, float, float] = (0.5, 0.5, 0.5)
DTL_STD: Tuple[float, float, float] = (0.5, 0.5, 0.5)
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)

def rand_augment_hparams(img_size: int, mean: Sequence[float] = DTL_MEAN) -> dict:
    """The RandAugment hparams timm's ``create_transform`` derives (translate 100 and fill 128 at 224)."""
    return dict(
        translate_const=int(img_size * 0.45),
        img_mean=tuple(min(255, round(255 * m)) for m in mean),
        interpolation=str_to_pil_interp("bicubic"),
    )


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize op, with 0 bits kept = an all-black image on every Pillow.

    At 0 bits Pillow < 13 built the lookup table ``i & ~255`` = 0 and applied it (L and RGB: all zeros; other
    modes: the same error as at any other bit count); Pillow >= 13 refuses 0 bits. Here the mode is checked by
    Pillow itself at 1 bit (same errors as before), then the zero table is applied to the image (L, RGB) or to
    its palette colours (P, where the installed Pillow supports posterize; alpha kept, as Pillow does).
    """
    if bits_to_keep != 0:
        return timm_aa.posterize(img, bits_to_keep, **kwargs)
    ImageOps.posterize(img, 1)  # Pillow's own mode checks (raises for modes posterize does not support)
    if img.mode == "P":
        out = img.copy()
        mode = out.palette.mode
        colors = out.getpalette(None)
        out.putpalette([v if mode[i % len(mode)] == "A" else 0 for i, v in enumerate(colors)], mode)
        return out
    return img.point([0] * 256 * len(img.getbands()))


def rand_augment(config: str, hparams: dict):
    """timm's ``rand_augment_transform(config, hparams)`` with :func:`posterize` as the function of its posterize
    ops (``Posterize``, ``PosterizeIncreasing``, ``PosterizeOriginal``); nothing else changes."""
    ra = rand_augment_transform(config, hparams)
    for op in ra.ops:
        if op.aug_fn is timm_aa.posterize:
            op.aug_fn = posterize
    return ra


def _final(normalize: bool, mean: Sequence[float], std: Sequence[float]) -> list:
    if normalize:
        return [T.ToTensor(), T.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))]
    return [T.PILToTensor()]


def build_transform(
        benchmark: str,
        is_train: bool,
        img_size: int = 224,
        normalize: bool = True,
        mean: Sequence[float] = DTL_MEAN,
        std: Sequence[float] = DTL_STD,
) -> Callable:
    """The transform of ``benchmark`` (``vtab``, ``few_shot``, ``domain_generalization``) for train or test.

    Args:
        benchmark: benchmark name.
        is_train: training (augmented for few_shot / domain_generalization) or evaluation transform.
        img_size: output side length.
        normalize: end in ToTensor + Normalize (float32, normalised); ``False``: end in PILToTensor (uint8
            0..255, normalise on the device with :func:`normalize_uint8_batch`).
        mean, std: normalisation constants (default 0.5 / 0.5 as every original recipe).
    """
    bench = get_benchmark(benchmark)
    bicubic = InterpolationMode.BICUBIC
    if is_train and bench.augment_train:
        tfl = [
            RandomResizedCropAndInterpolation(img_size, scale=RRC_SCALE, ratio=RRC_RATIO, interpolation="bicubic"),
            T.RandomHorizontalFlip(p=0.5),
            rand_augment(RAND_AUGMENT, rand_augment_hparams(img_size, mean)),
        ]
    else:
        resize = int(img_size * bench.eval_resize)
        tfl = [T.Resize((resize, resize), interpolation=bicubic), T.CenterCrop(img_size)]
    return T.Compose(tfl + _final(normalize, mean, std))


def transform_is_deterministic(benchmark: str, is_train: bool) -> bool:
    """Whether the transform maps an image to the same tensor every time (all VTAB transforms, every test
    transform); a prefix/feature cache is only valid for deterministic transforms."""
    return not (is_train and get_benchmark(benchmark).augment_train)


class Uint8Normalizer:
    """``ToTensor`` + ``Normalize`` for uint8 batches ``B x C x H x W`` on ``device``, with the constants (255,
    mean, std) made once as float32 tensors on that device.

    Every step divides by a *tensor*, as ``ToTensor`` (``x / 255`` on the CPU) and ``Normalize`` (``sub_(mean)
    .div_(std)``) do: on CUDA, dividing by a Python number is computed as a multiplication by its reciprocal,
    one ulp away from ``x / 255`` for about half the pixel values. So the result equals the CPU path bitwise, on
    any device, and no per-batch host-to-device copy of the constants is needed.
    """

    def __init__(self, mean: Sequence[float] = DTL_MEAN, std: Sequence[float] = DTL_STD,
                 device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        self.device = device
        self.scale = torch.full((1,), 255.0, dtype=torch.float32, device=device)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(device)

    def __call__(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"normalize_uint8_batch expects a uint8 batch, got {x.dtype}")
        if x.device != self.scale.device:
            raise ValueError(f"the batch is on {x.device}, the normaliser's constants on {self.scale.device}")
        out = x.to(torch.float32).div_(self.scale).sub_(self.mean).div_(self.std)
        return out if dtype == torch.float32 else out.to(dtype)


def normalize_uint8_batch(
        x: torch.Tensor,
        mean: Sequence[float] = DTL_MEAN,
        std: Sequence[float] = DTL_STD,
        dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Normalise a uint8 batch ``B x C x H x W`` (from ``normalize=False`` transforms), on its device.

    Performs ``ToTensor``'s ``/255`` then ``Normalize``'s ``(x - mean) / std`` in float32, dividing by tensors, so
    the result equals the CPU ``normalize=True`` path exactly; cast to ``dtype`` at the end. (Makes the constants
    on every call: loops keep a :class:`Uint8Normalizer` instead.)
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize_uint8_batch expects a uint8 batch, got {x.dtype}")
    return Uint8Normalizer(mean, std, x.device)(x, dtype)
