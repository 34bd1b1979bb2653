"""Every exception type that stands for a *user* mistake, in one leaf module (imports nothing of the project).

The entry points (``train.py``, ``tools/*.py``) turn these into one ``error: ...`` line and exit status 2;
anything else is a failure of the environment (exit 1) or a bug (a traceback). The message of each names the
flag, file, line or setting to change. The modules that raise them re-export them under their old names
(``data.errors.DataError``, ``models.config.ModelSettingsError``, ...), so either import works.
"""
from __future__ import annotations

import re

__all__ = ["UsageError", "DataError", "UnknownNameError", "CheckpointError", "BackboneMismatchError",
           "ModelSettingsError", "USER_ERROR_TYPES"]


class UsageError(ValueError):
    """A wrong flag or flag combination; the message names the flag."""


# torch's DataLoader re-raises a worker's exception as ``type(e)(msg)`` with ``msg`` = this header, the worker's
# traceback, and last ``<module>.<type>: <original message>``.
_WORKER_HEADER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def _worker_message(msg: str, type_name: str) -> str:
    """The original message of an exception re-raised by a DataLoader worker (``msg`` unchanged otherwise)."""
    if not _WORKER_HEADER.match(msg):
        return msg
    last = re.compile(rf"^(?:[\w.]+\.)?{re.escape(type_name)}: ", re.M)
    found = list(last.finditer(msg))
    return msg[found[-1].end():].rstrip("\n") if found else msg


class DataError(ValueError):
    """Bad data: a missing folder/list file, a malformed list line, a label out of range, a missing or
    unreadable image. The message always names the file (and, for list lines, the 1-based line number).

    Raised in a DataLoader worker, torch re-raises it in the main process with the worker's traceback as its
    message; the constructor keeps only the original message, so it reads the same with any --num_workers."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_worker_message(args[0], type(self).__name__),)
        super().__init__(*args)


class UnknownNameError(ValueError):
    """An unknown benchmark, dataset, task, target, method or backbone family; the message lists the valid names."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


class BackboneMismatchError(CheckpointError):
    """A delta trained on other backbone weights than the ones given (``--allow_backbone_mismatch`` overrides)."""


class ModelSettingsError(ValueError):
    """A model setting that cannot be used (a block range, a rank, a baseline's setting, a backbone name or
    keyword argument): the user's flags are wrong, the message names the setting."""


#: The user-error types of this module (entry points add their own, e.g. a busy run folder's lock error).
USER_ERROR_TYPES = (UsageError, DataError, UnknownNameError, CheckpointError, ModelSettingsError)
