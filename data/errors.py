"""The exception types for bad data and unknown names (kept free of heavy imports)."""

__all__ = ["DataError", "UnknownNameError"]


class DataError(ValueError):
    """Bad data: a missing folder/list file, a malformed list line, a label out of range, a missing or
    unreadable image. The message always names the file (and, for list lines, the 1-based line number)."""


class UnknownNameError(ValueError):
    """An unknown benchmark, dataset, task or target name; the message lists the valid names."""
