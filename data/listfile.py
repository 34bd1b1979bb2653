"""List files (``relative/path label`` per line) and image decoding checks, without torch imports.

Paths may contain spaces, so each line is split on its LAST whitespace run; blank lines are ignored. Problems
are reported as :class:`~data.errors.DataError` naming the list file and the 1-based line number.
"""
from __future__ import annotations

import os
import re
from typing import Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

__all__ = ["ListEntry", "parse_index", "split_line", "read_lines", "iter_list_file", "parse_list_file",
           "parse_list_entries", "load_rgb", "to_rgb", "image_error", "inspect_image", "missing_reason",
           "UnsupportedImageError", "SIXTEEN_BIT_MODES"]

_LINE_RE = re.compile(r"^(?P<path>.*?)\s+(?P<label>\S+)$")
# A class index: ASCII digits only (Python's int() also reads '+3', '0_3' and full-width digits such as '３').
_INDEX_RE = re.compile(r"-?[0-9]+")


def parse_index(text: str) -> Optional[int]:
    """``text`` as a class index when it is ASCII digits (a leading ``-`` is read, to be refused as out of
    range), else ``None``."""
    return int(text) if _INDEX_RE.fullmatch(text) else None


class ListEntry(tuple):
    """One parsed list line: ``(path, label, line_no)`` (path as written in the list)."""

    __slots__ = ()

    def __new__(cls, path: str, label: int, line_no: int):
        return super().__new__(cls, (path, label, line_no))

    @property
    def path(self) -> str:
        return self[0]

    @property
    def label(self) -> int:
        return self[1]

    @property
    def line_no(self) -> int:
        return self[2]


def read_lines(list_path: str) -> List[str]:
    if not os.path.exists(list_path):
        raise DataError(f"{list_path}: list file not found")
    if not os.path.isfile(list_path):
        raise DataError(f"{list_path}: expected a list file, found a directory or special file")
    try:
        with open(list_path, "r", encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{list_path}: not a UTF-8 text list file ({e})") from None
    except OSError as e:
        raise DataError(f"{list_path}: cannot read list file ({e})") from None


def split_line(line: str) -> Optional[Tuple[str, str]]:
    """``(path, label)`` of a ``path label`` line, split on its last whitespace run; ``None`` without a label."""
    m = _LINE_RE.match(line.strip())
    if m is None or not m.group("path"):
        return None
    return m.group("path"), m.group("label")


def _parse_line(line: str, num_classes: Optional[int]) -> Tuple[Optional[Tuple[str, int]], Optional[str]]:
    """Parse one non-blank line; return ``((path, label), None)`` or ``(None, problem)``."""
    text = line.strip()
    fields = split_line(text)
    if fields is None:
        return None, f"expected '<relative/path> <integer label>', got {text!r} (no label)"
    path, label_s = fields
    label = parse_index(label_s)
    if label is None:
        return None, f"label {label_s!r} is not an integer of ASCII digits 0-9 (line {text!r})"
    if label < 0 or (num_classes is not None and label >= num_classes):
        rng = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        return None, f"label {label} is outside the class range {rng} (line {text!r})"
    return (path, label), None


def iter_list_file(list_path: str, num_classes: Optional[int]
                   ) -> Iterator[Tuple[int, Optional[ListEntry], Optional[str]]]:
    """Yield ``(line_no, entry, problem)`` for every non-blank line; exactly one of entry/problem is set.

    Used by the data checker to collect all problems; :func:`parse_list_file` stops at the first one.
    Raises :class:`DataError` only when the file itself cannot be read.
    """
    for i, line in enumerate(read_lines(list_path), start=1):
        if not line.strip():
            continue
        parsed, problem = _parse_line(line, num_classes)
        if parsed is None:
            yield i, None, problem
        else:
            yield i, ListEntry(parsed[0], parsed[1], i), None


def parse_list_file(list_path: str, num_classes: Optional[int]) -> List[Tuple[str, int]]:
    """Parse a list file of ``relative/path label`` lines into ``[(path, label), ...]``.

    Lines are split on their last whitespace run (paths may contain spaces); blank lines are ignored.
    Raises :class:`DataError` (``<file>:<line>: ...``) for a line without a label, a non-integer label, or a
    label outside ``[0, num_classes)`` (``num_classes=None``: only ``label >= 0`` is required).
    """
    return [(e.path, e.label) for e in parse_list_entries(list_path, num_classes)]


def parse_list_entries(list_path: str, num_classes: Optional[int]) -> List[ListEntry]:
    entries: List[ListEntry] = []
    for line_no, entry, problem in iter_list_file(list_path, num_classes):
        if problem is not None:
            raise DataError(f"{list_path}:{line_no}: {problem}")
        entries.append(entry)
    return entries


# 16-bit single-channel modes (PNG/TIFF grey images, common in medical and remote-sensing data).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# 32-bit integer / float images: no fixed value range, so no faithful 8-bit version.
UNSUPPORTED_MODES = {"I": "32-bit integer", "F": "32-bit float"}


class UnsupportedImageError(ValueError):
    """An image that decodes but has no faithful 8-bit RGB version (PIL modes ``I`` / ``F``)."""


def to_rgb(img: Image.Image, path: str = "") -> Image.Image:
    """``img`` as 8-bit RGB. 16-bit grey images (``I;16*``) are scaled to 8 bits (``round(v / 257)``, so 65535 ->
    255; PIL's own ``convert`` would clip every value above 255 to white); 32-bit integer or float images are
    refused with :class:`UnsupportedImageError`; every other mode goes through PIL's ``convert("RGB")``."""
    if img.mode in SIXTEEN_BIT_MODES:
        a = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((a + 128) // 257).astype(np.uint8), "L").convert("RGB")
    if img.mode in UNSUPPORTED_MODES:
        raise UnsupportedImageError(
            f"{UNSUPPORTED_MODES[img.mode]} image (PIL mode {img.mode}) has no fixed value range: convert it to "
            f"8- or 16-bit first")
    return img.convert("RGB")


def missing_reason(path: str) -> str:
    """Why a listed ``path`` that is not a regular file cannot be used: ``is a directory, not an image file`` or
    ``image file not found``."""
    return "is a directory, not an image file" if os.path.isdir(path) else "image file not found"


def load_rgb(path: str) -> Image.Image:
    """Open an image with PIL and convert it to 8-bit RGB with :func:`to_rgb` (this decodes the whole file)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return to_rgb(img, path)


def inspect_image(path: str) -> Tuple[Optional[str], Optional[str]]:
    """``(error, note)`` for ``path``: why it cannot be used (``None`` when it decodes to RGB), and a note for
    images that are converted in a way worth knowing (16-bit images scaled to 8 bits)."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            mode = img.mode
            to_rgb(img, path)
    except FileNotFoundError:
        return "file not found", None
    except IsADirectoryError:
        return "is a directory, not an image file", None
    except UnidentifiedImageError:
        return "unreadable image (not a recognised image format)", None
    except UnsupportedImageError as e:
        return f"unsupported image: {e}", None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return f"unreadable image ({type(e).__name__}: {e})", None
    if mode in SIXTEEN_BIT_MODES:
        return None, f"16-bit image (PIL mode {mode}): scaled to 8 bits at load (value / 257)"
    return None, None


def image_error(path: str) -> Optional[str]:
    """Return why ``path`` cannot be decoded as an image, or ``None`` when it decodes fine."""
    return inspect_image(path)[0]
