"""List-file image datasets shared by the benchmarks (VTAB-1k, few-shot FGFS, domain generalisation, your own data).

A list file holds one sample per line: ``relative/path label``. Paths may contain spaces, so each line is split
on its LAST whitespace run. Blank lines are ignored. Every problem is reported as a :class:`DataError` whose
message names the list file and the 1-based line number (or the image file), before any long work starts.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .errors import DataError
from .listfile import (ListEntry, UnsupportedImageError, image_error, iter_list_file, load_rgb, missing_reason,
                       parse_list_entries, parse_list_file)

__all__ = [
    "DataError", "ListEntry", "parse_list_file", "iter_list_file", "ListFileDataset", "load_rgb", "image_error",
]

_logger = logging.getLogger(__name__)


class ListFileDataset(Dataset):
    """Images listed in a ``path label`` list file, with paths relative to ``image_root``.

    Args:
        image_root: folder the list's relative paths start from (absolute paths in the list are kept).
        list_path: the list file.
        num_classes: class count; every label must lie in ``[0, num_classes)``.
        transform: applied to the RGB PIL image.
        skip_bad_images: drop missing files at construction and (through :meth:`verify_images`) unreadable
            ones, counting them in ``num_skipped``, instead of failing.
        check_files: verify at construction that every listed file exists (fast ``os.path.isfile``).
        entries: the samples, already parsed (``--benchmark folder``: class-name labels, CSV, image folders);
            ``list_path`` then only names their source in messages.

    Attributes: ``samples`` (list of ``(absolute path, label)``), ``targets``, ``num_classes``, ``list_path``,
    ``image_root``, ``num_skipped``, ``skipped`` (list of ``(path, line_no, reason)``).
    """

    def __init__(
            self,
            image_root: str,
            list_path: str,
            num_classes: int,
            transform: Optional[Callable] = None,
            skip_bad_images: bool = False,
            check_files: bool = True,
            entries: Optional[Sequence[ListEntry]] = None,
    ) -> None:
        if not os.path.isdir(image_root):
            raise DataError(f"{image_root}: image folder not found (images of list file {list_path})")
        self.image_root = os.path.abspath(image_root)
        self.list_path = os.path.abspath(list_path)
        self.num_classes = int(num_classes)
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.num_skipped = 0
        self.skipped: List[Tuple[str, int, str]] = []
        if entries is None:
            entries = parse_list_entries(list_path, num_classes)
        if not entries:
            raise DataError(f"{list_path}: list file has no samples")
        samples = [(os.path.normpath(os.path.join(self.image_root, e.path)), e.label) for e in entries]
        lines = [e.line_no for e in entries]
        if check_files:
            missing = [i for i, (p, _) in enumerate(samples) if not os.path.isfile(p)]
            if missing:
                if not skip_bad_images:
                    i = missing[0]
                    more = f" ({len(missing)} of {len(samples)} listed files are missing)" if len(missing) > 1 else ""
                    raise DataError(f"{samples[i][0]}: {missing_reason(samples[i][0])} (listed at {list_path}:"
                                    f"{lines[i]}){more}")
                drop = set(missing)
                for i in missing:
                    self.skipped.append((samples[i][0], lines[i], missing_reason(samples[i][0])))
                samples = [s for i, s in enumerate(samples) if i not in drop]
                lines = [n for i, n in enumerate(lines) if i not in drop]
                self.num_skipped = len(missing)
                _logger.warning("%s: skipped %d missing image file(s)", list_path, len(missing))
                if not samples:
                    raise DataError(f"{list_path}: every listed image is missing")
        self.samples: List[Tuple[str, int]] = samples
        self._line_nos: List[int] = lines

    @property
    def targets(self) -> List[int]:
        return [t for _, t in self.samples]

    def line_no(self, index: int) -> int:
        """1-based list-file line of sample ``index``."""
        return self._line_nos[index]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        """The RGB PIL image of sample ``index``; :class:`DataError` naming the file and list line on failure."""
        path = self.samples[index][0]
        try:
            return load_rgb(path)
        except UnidentifiedImageError:
            hint = " (pass --skip_bad_images to drop unreadable images)" if not self.skip_bad_images else ""
            raise DataError(f"{path}: unreadable image (not a recognised image format), listed at "
                            f"{self.list_path}:{self._line_nos[index]}{hint}") from None
        except UnsupportedImageError as e:
            raise DataError(f"{path}: unsupported image: {e} (listed at {self.list_path}:{self._line_nos[index]})"
                            ) from None
        except Exception as e:
            hint = " (pass --skip_bad_images to drop unreadable images)" if not self.skip_bad_images else ""
            raise DataError(f"{path}: unreadable image, listed at {self.list_path}:{self._line_nos[index]} "
                            f"({type(e).__name__}: {e}){hint}") from None

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index][1]

    def verify_images(self, num_workers: Optional[int] = None) -> int:
        """Decode every image once and drop the unreadable ones (use with ``skip_bad_images``).

        Returns the total number of skipped samples (missing at construction + unreadable), also stored in
        ``num_skipped``. Without ``skip_bad_images`` the first unreadable image raises :class:`DataError`.
        """
        workers = num_workers or min(8, os.cpu_count() or 1)
        paths = [p for p, _ in self.samples]
        if workers > 1 and len(paths) > 64:
            with ThreadPoolExecutor(workers) as ex:
                errors = list(ex.map(image_error, paths, chunksize=32))
        else:
            errors = [image_error(p) for p in paths]
        bad = [i for i, err in enumerate(errors) if err is not None]
        if bad and not self.skip_bad_images:
            i = bad[0]
            raise DataError(f"{paths[i]}: {errors[i]}, listed at {self.list_path}:{self._line_nos[i]}"
                            + (f" ({len(bad)} unreadable images in this list)" if len(bad) > 1 else ""))
        if bad:
            drop = set(bad)
            for i in bad:
                self.skipped.append((paths[i], self._line_nos[i], errors[i]))
            self.samples = [s for i, s in enumerate(self.samples) if i not in drop]
            self._line_nos = [n for i, n in enumerate(self._line_nos) if i not in drop]
            self.num_skipped += len(bad)
            _logger.warning("%s: skipped %d unreadable image(s)", self.list_path, len(bad))
            if not self.samples:
                raise DataError(f"{self.list_path}: no readable image left")
        return self.num_skipped

    def class_counts(self) -> List[int]:
        """Number of samples per class (length ``num_classes``)."""
        counts = [0] * self.num_classes
        for _, t in self.samples:
            counts[t] += 1
        return counts

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(list={self.list_path!r}, n={len(self)}, num_classes={self.num_classes}"
                + (f", skipped={self.num_skipped}" if self.num_skipped else "") + ")")
