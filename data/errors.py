"""The one exception type for bad data (kept free of heavy imports)."""

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad data: a missing folder/list file, a malformed list line, a label out of range, a missing or
    unreadable image. The message always names the file (and, for list lines, the 1-based line number)."""
