"""Errors that reach the user as one line naming the file and the problem."""


class DamageError(Exception):
    """Base class for user-facing errors (bad input, failed gates)."""


class DatasetError(DamageError):
    """The dataset is missing, unreadable or inconsistent (message names the file)."""


class GateFailed(DamageError):
    """A quality gate (data, parity, accuracy, promotion) refused to let work continue."""
