"""Errors that reach the user as one line naming the file and the problem."""

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class DamageError(Exception):
    """Base class for user-facing errors (bad input, failed gates)."""


class DatasetError(DamageError):
    """The dataset is missing, unreadable or inconsistent (message names the file)."""


class GateFailed(DamageError):
    """A quality gate (data, parity, accuracy, promotion) refused to let work continue."""


def load_file(path: Path, load: Callable[[Path], T], what: str, error: type[DamageError] = DamageError) -> T:
    """``load(path)``, with a missing file and any exception of the loader turned into ``error`` naming the file.

    Example:
        >>> data = load_file(Path("data.yaml"), read_data_yaml, "data.yaml", DatasetError)  # doctest: +SKIP
        DatasetError: data.yaml: cannot load data.yaml: <the loader's error>
    """
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return load(path)
    except Exception as e:  # corrupt file, wrong format, unpicklable: say which file
        raise error(f"{path}: cannot load {what}: {e}") from e
