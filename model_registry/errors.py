"""Registry errors: each is a one-line, user-facing message (``DamageError`` subclasses)."""

from __future__ import annotations

from damage.tasks.core.errors import DamageError


class RegistryError(DamageError):
    """A registry operation could not be done (missing model/version, bad input)."""


class PromotionRefused(RegistryError):
    """The requested alias move breaks the promotion rules (ungated, rejected, not at staging)."""


class AccessDenied(RegistryError):
    """The MLflow identity in use may not do this (client-side policy or server 401/403)."""


class RegistryLockTimeout(RegistryError):
    """Another process held the registry lock for longer than the allowed wait."""
