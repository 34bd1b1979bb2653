"""Every exception type that stands for a *user* mistake, in one leaf module (imports nothing of the project).

The entry points (``train.py``, ``tools/*.py``) turn these into one ``error: ...`` line and exit status 2;
anything else is a failure of the environment (exit 1) or a bug (a traceback). The message of each names the
flag, file, line or setting to change. The modules that raise them re-export them under their old names
(``data.errors.DataError``, ``models.config.ModelSettingsError``, ...), so either import works.
"""
from __future__ import annotations

__all__ = ["UsageError", "DataError", "UnknownNameError", "CheckpointError", "BackboneMismatchError",
           "ModelSettingsError", "USER_ERROR_TYPES"]


class UsageError(ValueError):
    """A wrong flag or flag combination; the message names the flag."""


class DataError(ValueError):
    """Bad data: a missing folder/list file, a malformed list line, a label out of range, a missing or
    unreadable image. The message always names the file (and, for list lines, the 1-based line number)."""


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
