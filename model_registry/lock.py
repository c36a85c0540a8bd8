"""A cross-process lock for alias moves that works against a remote ``mlflow server``.

MLflow has no transactions and no compare-and-set on tags, so "set a lock tag, then read it
back" cannot exclude a writer that read the tag before we wrote it. The registry does have
one atomic primitive that every backend and the REST API share: registered-model names
are unique, so ``CreateRegisteredModel`` either creates the name or fails with
``RESOURCE_ALREADY_EXISTS`` (a primary-key insert in the SQL store, whatever the number of
server workers). The lock is therefore a registered model named ``<model>.lock``: create it
to acquire, delete it to release. Tags on it say who holds it and until when, so a lock left
by a crashed process can be broken after ``ttl_s``.

Under the basic-auth app the creator of the lock model gets MANAGE on it (so it can delete
it) and the grant is swept when it is deleted, so no extra permission setup is needed.
Breaking someone else's *stale* lock needs MANAGE on it; without it the error says so.

Only SQL backends (SQLite, PostgreSQL, MySQL; directly or behind ``mlflow server``) make the
create atomic; the legacy file store does not and is not supported for concurrent promotion.
"""

from __future__ import annotations

import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from model_registry.errors import AccessDenied, RegistryLockTimeout

LOCK_SUFFIX = ".lock"
TAG_OWNER = "lock.owner"
TAG_HOLDER = "lock.holder"
TAG_EXPIRES = "lock.expires_at"


def lock_name(model_name: str) -> str:
    """Name of the registered model that serves as the lock for ``model_name``."""
    return f"{model_name}{LOCK_SUFFIX}"


def _code(e: MlflowException) -> str:
    return str(getattr(e, "error_code", ""))


def _read_lock(client: MlflowClient, name: str) -> dict[str, str] | None:
    try:
        return dict(client.get_registered_model(name).tags)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in _code(e):
            return None
        raise


def _break_stale(client: MlflowClient, name: str, owner: str) -> None:
    """Delete a lock whose holder's lease ran out (re-read first: only that exact holder's lock)."""
    tags = _read_lock(client, name)
    if not tags or tags.get(TAG_OWNER) != owner:
        return  # released or re-acquired meanwhile
    try:
        client.delete_registered_model(name)
    except MlflowException as e:
        code = _code(e)
        if "RESOURCE_DOES_NOT_EXIST" in code:
            return
        if "PERMISSION_DENIED" in code or "UNAUTHENTICATED" in code:
            raise AccessDenied(
                f"registry lock '{name}' held by {tags.get(TAG_HOLDER)!r} expired but this MLflow user "
                f"may not delete it; an MLflow admin must delete registered model '{name}'"
            ) from None
        raise


@contextmanager
def registry_lock(client: MlflowClient, model_name: str, holder: str = "", *, timeout_s: float = 60.0,
                  ttl_s: float = 120.0, poll_s: float = 0.05) -> Iterator[str]:
    """Hold the promotion lock of ``model_name`` for the duration of the ``with`` block.

    Args:
        client: client for the registry (explicit URI; local SQL store or remote server).
        model_name: registered model whose aliases are about to move.
        holder: who is asking (recorded on the lock for error messages).
        timeout_s: how long to wait for another holder before giving up.
        ttl_s: lease length; a lock older than this is considered abandoned and broken.
        poll_s: base back-off between attempts (randomised, doubling up to 1 s).

    Yields:
        The owner token of this acquisition.

    Raises:
        RegistryLockTimeout: another process kept the lock for more than ``timeout_s``.

    Example:
        >>> with registry_lock(client, "damage-seg", holder="alice"):
        ...     client.set_registered_model_alias("damage-seg", "production", "3")
    """
    name = lock_name(model_name)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + timeout_s
    delay = poll_s
    while True:
        tags = {TAG_OWNER: owner, TAG_HOLDER: holder or owner, TAG_EXPIRES: f"{time.time() + ttl_s:.3f}"}
        try:
            client.create_registered_model(
                name, tags=tags, description=f"promotion lock for '{model_name}' (model_registry); do not use"
            )
            break
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in _code(e):
                raise
        current = _read_lock(client, name)
        if current is not None:
            try:
                expired = float(current.get(TAG_EXPIRES, "0")) < time.time()
            except ValueError:  # a hand-made model with that name: treat as held, never delete it
                expired = False
            if expired:
                _break_stale(client, name, current.get(TAG_OWNER, ""))
                continue
        if time.monotonic() >= deadline:
            who = (current or {}).get(TAG_HOLDER, "?")
            raise RegistryLockTimeout(
                f"registry lock '{name}' is held by {who!r}; gave up after {timeout_s:.0f} s "
                f"(if that process died, the lock expires after its lease)"
            )
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 1.0)
    try:
        yield owner
    finally:
        current = _read_lock(client, name)
        if current is not None and current.get(TAG_OWNER) == owner:
            try:
                client.delete_registered_model(name)
            except MlflowException as e:
                if "RESOURCE_DOES_NOT_EXIST" not in _code(e):
                    raise
