"""Prefect task wrappers around the registry functions (the plain functions stay Prefect-free).

Caching is off: every call reads or moves live registry state.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from model_registry.gate import gate_candidate
from model_registry.registry import VersionInfo, approve, register_candidate, reject


def decide(client, name: str, version: str | int, approved: bool, by: str, reason: str, *,
           approvers: Sequence[str] | None = None, lock_timeout_s: float = 60.0) -> VersionInfo:
    """Apply a human decision: ``approve`` when ``approved`` else ``reject`` (same code as the CLI)."""
    if approved:
        return approve(client, name, version, by, reason, approvers=approvers, lock_timeout_s=lock_timeout_s)
    return reject(client, name, version, by, reason, approvers=approvers, lock_timeout_s=lock_timeout_s)


register_task = task(register_candidate, name="registry-register", cache_policy=NO_CACHE)
gate_task = task(gate_candidate, name="registry-gate", cache_policy=NO_CACHE)
decide_task = task(decide, name="registry-decide", cache_policy=NO_CACHE)
