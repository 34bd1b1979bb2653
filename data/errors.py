"""The exception types for bad data and unknown names (kept free of heavy imports)."""

import os

__all__ = ["DataError", "UnknownNameError", "require_root"]


from utils.errors import DataError, UnknownNameError


def require_root(data_dir: str, what: str) -> None:
    """:class:`DataError` unless ``data_dir`` is an existing folder; an empty value is named as such (it is
    usually an unset ``DATA_DIR`` of a launcher), a file as a file."""
    if not str(data_dir).strip():
        raise DataError(f"no {what} given: --data_dir is empty (the launchers' DATA_DIR; set it to the folder that "
                        f"holds the benchmark, see the README's data preparation)")
    if os.path.isfile(data_dir):
        raise DataError(f"{data_dir}: {what} is a file, not a folder")
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: {what} not found")
