"""A cross-process lock for alias moves that works against a remote ``mlflow server``.

MLflow has no transactions and no compare-and-set on tags, so "set a lock tag, then read it
back" cannot exclude a writer that read the tag before we wrote it. The registry does have
one atomic primitive that every backend and the REST API share: registered-model names
are unique, so ``CreateRegisteredModel`` either creates the name or fails with
``RESOURCE_ALREADY_EXISTS`` (a primary-key insert in the SQL store, whatever the number of
server workers). The lock is therefore a registered model named ``<model>.lock``: create it
to acquire, delete it to release.

Leases, judged by one clock
---------------------------
Every timestamp used here is the tracking server's: the lock's ``last_updated_timestamp``
(set by the server on create and on every renewal) is compared with the server's "now",
read from the creation time of a throw-away probe model. No client's wall clock is ever
compared with another's, so a host whose clock runs minutes ahead cannot break a live lock.
The holder renews the lease (``UpdateRegisteredModel``, which moves ``last_updated_timestamp``)
every ``ttl_s / 3`` from a background thread while the ``with`` block runs, so long critical
sections keep their lock; a holder that died stops renewing and its lock goes stale after
``ttl_s``.

Breaking a stale lock
---------------------
Breaking is itself a lock: only the process that creates ``<model>.lock.break`` may delete a
stale lock, after re-reading it and checking it is still the very lease it judged stale
(same owner, same server timestamp). A second breaker fails to create the break marker and
simply waits, so it can never delete the lock a new holder took meanwhile. A break marker
left by a crashed breaker is itself removed once it is ``max(ttl_s, MARKER_TTL_S)`` old (server
time). Not ``ttl_s`` alone: a short lease says nothing about how long a live breaker needs between
its re-read and its delete, and removing a live breaker's marker lets a second breaker judge the
same stale lease, delete the lock the first one has just taken, and hold it too (seen in CI with a
0.5 s lease and a breaker whose delete took 1 s).

A lock model without the owner tag or with a non-numeric lease is *malformed*; it is treated
as stale (logged as a warning) so that a hand-made or half-written lock cannot block
promotions forever.

Under the basic-auth app the creator of the lock model gets MANAGE on it (so it can delete
it) and the grant is swept when it is deleted, so no extra permission setup is needed.
Breaking someone else's *stale* lock needs MANAGE on it; without it the error says so.

Only SQL backends (SQLite, PostgreSQL, MySQL; directly or behind ``mlflow server``) make the
create atomic; the legacy file store does not and is not supported for concurrent promotion.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from damage.model_registry.errors import AccessDenied, RegistryLockTimeout

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
BREAK_SUFFIX = ".break"
CLOCK_SUFFIX = ".clock."
TAG_OWNER = "lock.owner"
TAG_HOLDER = "lock.holder"
TAG_TTL = "lock.ttl_s"
# A break marker younger than this (server time) belongs to a live breaker, whatever the lock's lease.
MARKER_TTL_S = 60.0


def lock_name(model_name: str) -> str:
    """Name of the registered model that serves as the lock for ``model_name``."""
    return f"{model_name}{LOCK_SUFFIX}"


def _code(e: MlflowException) -> str:
    return str(getattr(e, "error_code", ""))


def _get(client: MlflowClient, name: str):
    """The registered model ``name`` or None when it does not exist."""
    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in _code(e):
            return None
        raise


def _delete(client: MlflowClient, name: str, what: str) -> None:
    try:
        client.delete_registered_model(name)
    except MlflowException as e:
        code = _code(e)
        if "RESOURCE_DOES_NOT_EXIST" in code:
            return
        if "PERMISSION_DENIED" in code or "UNAUTHENTICATED" in code:
            raise AccessDenied(f"{what} but this MLflow user may not delete it; an MLflow admin must delete "
                               f"registered model '{name}'") from None
        raise


def server_now_ms(client: MlflowClient, base: str) -> int:
    """The tracking server's current time in ms: the creation time of a throw-away probe model."""
    probe = f"{base}{CLOCK_SUFFIX}{uuid.uuid4().hex}"
    rm = client.create_registered_model(probe, description="clock probe of a registry lock; deleted at once")
    try:
        return int(rm.creation_timestamp or client.get_registered_model(probe).creation_timestamp)
    finally:
        try:
            client.delete_registered_model(probe)
        except MlflowException:
            log.warning("could not delete clock probe model '%s'", probe)


def _lease(rm) -> tuple[str, float] | None:
    """``(owner, ttl_s)`` of a lock model, or None when it is malformed."""
    tags = dict(rm.tags or {})
    owner = tags.get(TAG_OWNER)
    try:
        ttl = float(tags.get(TAG_TTL, ""))
    except ValueError:
        return None
    if not owner or not ttl > 0:
        return None
    return owner, ttl


def _is_stale(client: MlflowClient, rm, now_ms: int, max_ttl_s: float) -> bool:
    """Stale after its own TTL, but never later than ``max_ttl_s`` (the waiter's lease length): the TTL tag
    is written by whoever created the lock model, and any account may create one (issue 31)."""
    lease = _lease(rm)
    if lease is None:
        log.warning("registry lock '%s' is malformed (tags %s); treating it as stale", rm.name, dict(rm.tags or {}))
        return True
    return now_ms - int(rm.last_updated_timestamp or 0) > min(lease[1], max_ttl_s) * 1000


def _try_break(client: MlflowClient, name: str, judged) -> bool:
    """Delete the stale lock ``judged`` if this process wins the break marker; True if it did."""
    marker = f"{name}{BREAK_SUFFIX}"
    try:
        client.create_registered_model(marker, tags={TAG_OWNER: socket.gethostname()},
                                       description="a registry lock is being broken; deleted at once")
    except MlflowException as e:
        code = _code(e)
        if "RESOURCE_DOES_NOT_EXIST" in code:
            # the other breaker deleted the marker while the server was still writing ours (seen in CI): we did
            # not win the break, and the lock was not touched by us; wait and look again
            return False
        if "RESOURCE_ALREADY_EXISTS" not in code:
            raise
        stale_marker = _get(client, marker)  # a breaker that died between create and delete
        marker_ttl_s = max(float((_lease(judged) or ("", 120.0))[1]), MARKER_TTL_S)
        if stale_marker is not None and server_now_ms(client, name) - int(
                stale_marker.creation_timestamp or 0) > marker_ttl_s * 1000:
            log.warning("removing break marker '%s' left by a crashed process", marker)
            _delete(client, marker, f"break marker '{marker}' is stale")
        return False
    try:
        now = _get(client, name)
        # the very lease judged stale: same owner tags and no renewal since (server timestamps)
        if now is None or dict(now.tags or {}) != dict(judged.tags or {}) \
                or now.last_updated_timestamp != judged.last_updated_timestamp:
            return False
        holder = dict(judged.tags or {}).get(TAG_HOLDER, "?")
        log.warning("breaking stale registry lock '%s' held by %r", name, holder)
        _delete(client, name, f"registry lock '{name}' held by {holder!r} expired")
        return True
    finally:
        _delete(client, marker, f"break marker '{marker}'")


class _Renewer(threading.Thread):
    """Renews the lease every ``period_s`` while the lock is held (server-side timestamp)."""

    def __init__(self, client: MlflowClient, name: str, owner: str, period_s: float):
        super().__init__(name=f"renew-{name}", daemon=True)
        self.client = MlflowClient(tracking_uri=client.tracking_uri,
                                   registry_uri=getattr(client, "_registry_uri", None) or client.tracking_uri)
        self.lock_model, self.owner, self.period_s = name, owner, period_s
        self.stop = threading.Event()
        self.lost = False
        self.renewals = 0

    def run(self) -> None:
        while not self.stop.wait(self.period_s):
            try:
                rm = _get(self.client, self.lock_model)
                if rm is None or dict(rm.tags or {}).get(TAG_OWNER) != self.owner:
                    self.lost = True
                    log.error("registry lock '%s' was lost while held by %s", self.lock_model, self.owner)
                    return
                self.renewals += 1
                self.client.update_registered_model(self.lock_model, description=f"promotion lock; renewal "
                                                                                 f"{self.renewals}")
            except Exception as e:  # a missed renewal is retried next period; the lease has slack
                log.warning("registry lock '%s': renewal failed: %s", self.lock_model, e)


@contextmanager
def registry_lock(client: MlflowClient, model_name: str, holder: str = "", *, timeout_s: float = 60.0,
                  ttl_s: float = 120.0, poll_s: float = 0.05, renew_s: float | None = None) -> Iterator[str]:
    """Hold the promotion lock of ``model_name`` for the duration of the ``with`` block.

    Args:
        client: client for the registry (explicit URI; local SQL store or remote server).
        model_name: registered model whose aliases are about to move.
        holder: who is asking (recorded on the lock for error messages).
        timeout_s: how long to wait for another holder before giving up.
        ttl_s: lease length in server time; a lock not renewed for this long is broken.
        poll_s: base back-off between attempts (randomised, doubling up to 1 s).
        renew_s: renewal period (default ``ttl_s / 3``).

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
    tags = {TAG_OWNER: owner, TAG_HOLDER: holder or owner, TAG_TTL: f"{ttl_s:g}"}
    current = None
    while True:
        try:
            client.create_registered_model(
                name, tags=tags, description=f"promotion lock for '{model_name}' (model_registry); do not use"
            )
            break
        except MlflowException as e:
            if "RESOURCE_DOES_NOT_EXIST" in _code(e):
                # MLflow's SQL store answers a name clash by reading the existing model; when the holder
                # deleted it (released) in between, the create fails with "not found": try again.
                continue
            if "RESOURCE_ALREADY_EXISTS" not in _code(e):
                raise
        current = _get(client, name)
        if current is not None and _is_stale(client, current, server_now_ms(client, name), ttl_s):
            if _try_break(client, name, current):
                continue
        elif current is None:
            continue  # released between our create and our read
        if time.monotonic() >= deadline:
            who = dict(current.tags or {}).get(TAG_HOLDER, "?") if current is not None else "?"
            raise RegistryLockTimeout(
                f"registry lock '{name}' is held by {who!r}; gave up after {timeout_s:.0f} s "
                f"(if that process died, the lock expires {ttl_s:.0f} s after its last renewal)"
            )
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 1.0)
    renewer = _Renewer(client, name, owner, renew_s or ttl_s / 3)
    renewer.start()
    try:
        yield owner
    finally:
        renewer.stop.set()
        renewer.join(timeout=30)
        current = _get(client, name)
        if current is not None and dict(current.tags or {}).get(TAG_OWNER) == owner:
            try:
                client.delete_registered_model(name)
            except MlflowException as e:
                if "RESOURCE_DOES_NOT_EXIST" not in _code(e):
                    raise
